"""Reconstruction metrics over any number of batches: FVU per source and pooled, L0.

Every place that reports how well a crosscoder reconstructs (the trainer's logged and
held-out records, the diff's activation statistics, the benchmarks) accumulates the same
sums here, so their numbers mean the same thing:

    FVU_s = sum_tokens ||x_s - xhat_s||^2 / sum_tokens ||x_s - mean_s||^2

with ``mean_s`` the mean of source s over ALL the tokens measured (for the trainer's
logged record: its global batch; for an evaluation: the whole held-out set), never a
per-batch mean. The pooled FVU is the same ratio with both sums taken over every source.
L0 is the number of non-zero latent activations per token.

Batches combine exactly: each is centred on its own mean (squares of the spread, not of
the offset: no cancellation, however far the data sits from 0) and merged into the
running mean and sum of squares with the pairwise update of Chan, Golub and LeVeque
(1979). Data-parallel ranks merge their accumulators the same way
(:meth:`ReconstructionMetrics.merge_` on :meth:`~ReconstructionMetrics.packed`). Per-token
sums are taken in the data's precision (float32 at least), everything across tokens in
float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from crosscoders.model.sparse import SparseCodes

#: the smallest variance divided by: only keeps 0 / 0 (a constant source) from being NaN.
#: Far below the variance of real data at any scale, so FVU stays scale-free.
VAR_FLOOR = 1e-30


@dataclass(frozen=True)
class Reconstruction:
    """What :meth:`ReconstructionMetrics.result` reports (NaN where no tokens were seen)."""

    n_tokens: int
    fvu_S: list[float]  # per source
    fvu: float  # pooled over the sources
    l0: float  # non-zero latent activations per token
    dead_fraction: float | None  # share of latents that never fired (None: not counted)


class ReconstructionMetrics:
    """Running statistics for :class:`Reconstruction`, fed one batch at a time by
    :meth:`update`: token count, squared error, mean and sum of squares about it (per
    source), active-latent count.

    ``n_latents``: also count firings per latent (``count_F``, and the dead fraction).
    The statistics live on ``device``; each batch is reduced where it lies.
    """

    def __init__(self, n_sources: int, d_model: int, n_latents: int | None = None,
                 device: torch.device | str = "cpu") -> None:
        self.n_sources, self.d_model, self.n_latents = n_sources, d_model, n_latents
        f64 = {"dtype": torch.float64, "device": device}
        self.n_tokens = 0
        self.n_active = torch.zeros((), **f64)
        self.err_S = torch.zeros(n_sources, **f64)  # sum ||x - xhat||^2
        self.mean_SD = torch.zeros(n_sources, d_model, **f64)
        self.m2_S = torch.zeros(n_sources, **f64)  # sum ||x - mean||^2
        self.count_F = (None if n_latents is None
                        else torch.zeros(n_latents, dtype=torch.int64, device=device))

    @torch.no_grad()
    def update(self, x_BSD: Tensor, xhat_BSD: Tensor,
               codes: SparseCodes | Tensor | None = None, *,
               n_active: float | None = None) -> None:
        """Add a batch: activations, their reconstruction, and the latent code (sparse, or
        dense [B, F]) or, instead, the number of non-zero activations in it."""
        B = x_BSD.shape[0]
        if codes is not None:
            self._count(codes)
        if n_active is not None:
            self.n_active += n_active
        if B == 0:
            return
        dtype = torch.float64 if x_BSD.dtype == torch.float64 else torch.float32
        x = x_BSD.to(dtype)
        dev = self.err_S.device
        diff = x - xhat_BSD.to(dtype)
        err_S = diff.pow_(2).sum(-1).double().sum(0)
        del diff
        c_SD = x.mean(0)
        xc = x - c_SD
        r_SD = xc.sum(0).double()  # what rounding left between c and the batch's mean
        m2_S = xc.pow_(2).sum(-1).double().sum(0) - r_SD.pow(2).sum(-1) / B
        del xc
        mean_SD = c_SD.double() + r_SD / B
        self._merge(B, err_S.to(dev), mean_SD.to(dev), m2_S.to(dev))

    def _merge(self, n: int, err_S: Tensor, mean_SD: Tensor, m2_S: Tensor) -> None:
        """Chan et al.'s pairwise update with the sums of ``n`` more tokens."""
        if n == 0:
            return
        n_a = self.n_tokens
        total = n_a + n
        delta_SD = mean_SD - self.mean_SD
        self.mean_SD += delta_SD * (n / total)
        self.m2_S += m2_S + delta_SD.pow(2).sum(-1) * (n_a * n / total)
        self.err_S += err_S
        self.n_tokens = total

    def _count(self, codes: SparseCodes | Tensor) -> None:
        dev = self.n_active.device
        if isinstance(codes, SparseCodes):
            active_E = codes.value_E.detach() != 0
            self.n_active += active_E.sum().to(dev)
            if self.count_F is not None:
                latent_E = codes.latent_E[active_E]
                self.count_F += torch.bincount(latent_E, minlength=self.n_latents).to(dev)
            return
        active_BF = codes.detach() != 0
        if self.count_F is not None:
            count_F = active_BF.sum(0)
            self.count_F += count_F.to(dev)
            self.n_active += count_F.sum().to(dev)
        else:
            self.n_active += active_BF.sum().to(dev)

    # ------------------------------------------------------------------ combining
    def packed(self) -> Tensor:
        """Every statistic as one float64 vector, e.g. to gather from other processes."""
        parts = [torch.tensor([float(self.n_tokens)], dtype=torch.float64,
                              device=self.err_S.device),
                 self.n_active.reshape(1), self.err_S, self.m2_S, self.mean_SD.reshape(-1)]
        if self.count_F is not None:
            parts.append(self.count_F.double())
        return torch.cat(parts)

    def merge_(self, other: ReconstructionMetrics | Tensor) -> ReconstructionMetrics:
        """Add another accumulator's tokens (it, or its :meth:`packed` vector)."""
        if isinstance(other, ReconstructionMetrics):
            other = other.packed()
        S, D = self.n_sources, self.d_model
        other = other.to(self.err_S.device)
        err_S, m2_S = other[2:2 + 2 * S].reshape(2, S)
        end = 2 + 2 * S + S * D
        self._merge(int(round(float(other[0]))), err_S, other[2 + 2 * S: end].view(S, D), m2_S)
        self.n_active += other[1]
        if self.count_F is not None:
            self.count_F += other[end:].round().long()
        return self

    # ------------------------------------------------------------------ result
    def result(self) -> Reconstruction:
        n = self.n_tokens
        if n == 0:
            nan = float("nan")
            return Reconstruction(0, [nan] * self.n_sources, nan, nan, None)
        var_S = self.m2_S.clamp_min(VAR_FLOOR)
        fvu_S = (self.err_S / var_S).tolist()
        fvu = float(self.err_S.sum() / self.m2_S.sum().clamp_min(VAR_FLOOR))
        dead = None
        if self.count_F is not None:
            dead = float((self.count_F == 0).double().mean())
        return Reconstruction(n, fvu_S, fvu, float(self.n_active) / n, dead)
