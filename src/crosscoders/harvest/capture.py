"""Read the residual stream at chosen sites with forward hooks, stopping the forward early."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from crosscoders.harvest.sites import Site


class _StopForward(Exception):
    """Raised from a hook once every site is captured: nothing past it runs (no lm_head)."""


def hidden_states(value: Any) -> torch.Tensor:
    """The hidden-state tensor in a block's input args or output (tensor, tuple, ModelOutput)."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)):
        return value[0]
    if hasattr(value, "to_tuple"):
        return value.to_tuple()[0]
    raise TypeError(f"cannot find the hidden states in a block output of type {type(value)}")


class SiteReader:
    """Run a causal LM on token ids and return the residual stream at ``sites``.

    Each site is read by a hook on its block (a pre-hook for ``resid_in``); the hook of the
    last site to fire stops the forward with an exception, so later blocks, the final norm
    and the lm_head never run.
    """

    def __init__(self, model: nn.Module, blocks: nn.ModuleList, sites: Sequence[Site]) -> None:
        self.model = model
        self.blocks = blocks
        self.sites = list(sites)
        self._captured: dict[int, torch.Tensor] = {}

    def _make_hook(self, index: int, pre: bool) -> Any:
        def hook(module: nn.Module, args: Any, kwargs_or_out: Any, *rest: Any) -> None:
            if pre:
                value = args[0] if args else kwargs_or_out["hidden_states"]
            else:
                value = rest[0] if rest else kwargs_or_out
            hidden = hidden_states(value)
            if len(self._captured) + 1 == len(self.sites):
                self._captured[index] = hidden
                raise _StopForward
            # Later blocks may update their input in place; keep a copy.
            self._captured[index] = hidden.clone()

        return hook

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor) -> list[torch.Tensor]:
        """[B, T] token ids -> one [B, T, D] tensor per site (model dtype, model device)."""
        handles = []
        try:
            for i, site in enumerate(self.sites):
                block = self.blocks[site.layer]
                if site.kind == "resid_in":
                    handles.append(
                        block.register_forward_pre_hook(self._make_hook(i, True), with_kwargs=True)
                    )
                else:
                    handles.append(
                        block.register_forward_hook(self._make_hook(i, False), with_kwargs=True)
                    )
            self._captured = {}
            try:
                self.model(input_ids=input_ids, use_cache=False)
            except _StopForward:
                pass
            if len(self._captured) != len(self.sites):
                missing = [s.name for i, s in enumerate(self.sites) if i not in self._captured]
                raise RuntimeError(f"the forward pass never reached sites {missing}")
            return [self._captured[i] for i in range(len(self.sites))]
        finally:
            for handle in handles:
                handle.remove()
            self._captured = {}
