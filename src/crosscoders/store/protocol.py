"""The interface the trainer reads activations through (store on disk or streaming)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class ActivationSource(Protocol):
    """Training data for a crosscoder: float32 batches [B, S, D]."""

    n_sources: int
    d_model: int

    def batches(self, batch_size: int, seed: int, start: int = 0) -> Iterator[torch.Tensor]:
        """Endless shuffled batches of the training split; ``start=n`` resumes at batch n."""
        ...

    def eval_batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        """The held-out split, in order, finite (may be empty)."""
        ...

    def sample(self, n_tokens: int, seed: int) -> torch.Tensor:
        """About ``n_tokens`` random training rows [n, S, D]."""
        ...

    def mean_squared_norm(self) -> torch.Tensor | None:
        """[S] mean ||x_s||^2 over the training split, or None if unknown."""
        ...

    def describe(self) -> dict[str, Any]:
        """JSON-able identity of the data (a trainer refuses to resume on other data)."""
        ...
