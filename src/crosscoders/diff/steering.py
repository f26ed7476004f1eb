"""Steering: add a latent's decoder direction at its site and read what the model writes.

A quick check of what a latent does: ``h <- h + scale * W_dec[latent, source]`` at every
position (prompt and generated tokens), greedy decoding. ``scale`` is in units of the
latent's activation, so ``scale = max_act`` (from the latent table) adds the direction as
strongly as the latent ever fires; negative scales remove it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from crosscoders.diff.causal import SourceSite, replace_at_site
from crosscoders.errors import ConfigError
from crosscoders.harvest.sites import Site

if TYPE_CHECKING:
    from crosscoders.model import Crosscoder


@torch.inference_mode()
def steer(
    model: nn.Module,
    tokenizer: Any,
    crosscoder: Crosscoder,
    latent: int,
    source: int,
    site: SourceSite | Site,
    prompts: Sequence[str] | str,
    scales: Sequence[float] = (0.0, 1.0),
    max_new_tokens: int = 20,
) -> list[dict[str, Any]]:
    """Greedy continuations of each prompt with ``scale * d_latent`` added at ``site``.

    ``site`` is a :class:`SourceSite` or a harvest ``Site``; ``source`` selects which
    decoder vector (the model's own source). Returns one record per (prompt, scale) with
    the generated text (prompt excluded).
    """
    if not 0 <= latent < crosscoder.dict_size:
        raise ConfigError(f"latent {latent} is out of range [0, {crosscoder.dict_size})")
    site = site.site if isinstance(site, SourceSite) else site
    direction = crosscoder.W_dec[latent, source].detach().float()
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    device = next(model.parameters()).device
    out = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
        for scale in scales:
            def add(h: torch.Tensor, s: float = float(scale)) -> torch.Tensor:
                return h + s * direction.to(h.device, h.dtype)

            with replace_at_site(model, site, add):
                gen = model.generate(ids, attention_mask=torch.ones_like(ids),
                                     max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id)
            new = gen[0, ids.shape[1]:]
            out.append({"prompt": prompt, "latent": latent, "scale": float(scale),
                        "text": tokenizer.decode(new, skip_special_tokens=False),
                        "token_ids": new.tolist()})
    return out
