"""Latent Scaling (Minder et al. 2025): is a "chat-only" latent really absent from the base?

For latent i with reference decoder vector ``d`` (the chat decoder for chat-only latents)
and a target ``y`` the closed-form least-squares scale is

    beta = d^T (sum_n f_i(x_n) y_n) / (||d||^2 sum_n f_i(x_n)^2)

Targets, per model m: the reconstruction ``xhat_m`` and the error with the latent's own
contribution added back ``x_m - (xhat_m - f_i d_i^m)``. Ratios
``nu_r = beta_other_recon / beta_ref_recon`` (high: latent decoupling, the other model's
reconstruction carries the direction anyway) and ``nu_eps = beta_other_err / beta_ref_err``
(high: complete shrinkage, the other model has the direction but the decoder dropped it).
"Truly chat-only": ``nu_r < 0.5 and nu_eps < 0.2`` (the paper's rule; configurable).

Accumulation is sparse: only the E non-zero entries (n, i) of a batch's code contribute,
and ``d_i^T y_n`` is computed for those pairs only (a sampled dense-dense product, the
trainer's SDDMM kernel). Memory is O(subset size); cost O(E * D) per batch and target, far
below the encoder's O(B * S * D * F). Results are in sorted latent order.

Units: betas are reported in the normalised units the crosscoder was trained in (each
source scaled to mean squared norm D), the units of ``Crosscoder.decoder_norms``. On a
folded model that is ``beta_raw * c_m / c_ref``; on raw-unit data with equal scales the two
agree.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from crosscoders.configs import Config
from crosscoders.diff.stats import EncodedBatch, analysis_pass
from crosscoders.errors import ConfigError
from crosscoders.model.sparse import sampled_dot

if TYPE_CHECKING:
    from crosscoders.data import ActivationData
    from crosscoders.model import Crosscoder

TARGETS = ("recon", "err")


@dataclasses.dataclass
class TrulyExclusiveRule(Config):
    """A latent is truly exclusive when ``nu_r < nu_r_max`` and ``nu_eps < nu_eps_max``."""

    nu_r_max: float = 0.5
    nu_eps_max: float = 0.2

    def validate(self) -> None:
        for name in ("nu_r_max", "nu_eps_max"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")

    def apply(self, nu_r: np.ndarray, nu_eps: np.ndarray) -> np.ndarray:
        """[L] bool; NaN ratios (latent never fired) are not truly exclusive."""
        with np.errstate(invalid="ignore"):
            return (np.asarray(nu_r) < self.nu_r_max) & (np.asarray(nu_eps) < self.nu_eps_max)


@dataclasses.dataclass
class LatentScalingResult:
    """Betas and ratios for ``latents`` ([L] indices), reference source ``ref``."""

    latents: np.ndarray
    ref: int
    other: int
    beta_other_recon: np.ndarray
    beta_ref_recon: np.ndarray
    beta_other_err: np.ndarray
    beta_ref_err: np.ndarray
    sum_f2: np.ndarray
    n_tokens: int

    @property
    def nu_r(self) -> np.ndarray:
        return _ratio(self.beta_other_recon, self.beta_ref_recon)

    @property
    def nu_eps(self) -> np.ndarray:
        return _ratio(self.beta_other_err, self.beta_ref_err)

    def truly_exclusive(self, rule: TrulyExclusiveRule | None = None) -> np.ndarray:
        return (rule or TrulyExclusiveRule()).apply(self.nu_r, self.nu_eps)

    def columns(
        self, names: tuple[str, str], rule: TrulyExclusiveRule | None = None
    ) -> dict[str, np.ndarray]:
        """Table columns named by source (``names`` = (other, ref), e.g. ("base", "chat"))."""
        other, ref = names
        return {
            f"beta_{other}_recon": self.beta_other_recon,
            f"beta_{ref}_recon": self.beta_ref_recon,
            f"beta_{other}_err": self.beta_other_err,
            f"beta_{ref}_err": self.beta_ref_err,
            "nu_r": self.nu_r,
            "nu_eps": self.nu_eps,
            "truly_exclusive": self.truly_exclusive(rule),
        }


def _ratio(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(b != 0, a / np.where(b != 0, b, 1.0), np.nan)


class LatentScalingAccumulator:
    """Streaming sums for Latent Scaling of a latent subset; feed it :class:`EncodedBatch`es.

    ``ref`` is the source whose decoder vector is ``d`` (chat for chat-only latents);
    ``other`` the source compared with it (base).
    """

    def __init__(self, model: Crosscoder, latents: Any, ref: int = 1, other: int = 0) -> None:
        F_, S, _ = model.W_dec.shape
        for name, s in (("ref", ref), ("other", other)):
            if not 0 <= s < S:
                raise ConfigError(
                    f"{name}={s} is not a source index; the crosscoder has {S} (use 0..{S - 1})"
                )
        if ref == other:
            raise ConfigError(
                f"ref and other must be different sources, got {ref} twice; pick two sources"
            )
        idx = torch.as_tensor(np.asarray(latents, dtype=np.int64).reshape(-1))
        if idx.unique().numel() != idx.numel():
            raise ConfigError("latent indices contain duplicates; pass each latent once")
        idx = idx.sort().values
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= F_):
            raise ConfigError(f"latent indices must lie in [0, {F_}); got {idx.min()}..{idx.max()}")
        self.model, self.ref, self.other = model, ref, other
        device = model.W_dec.device
        self.latents = idx
        self.all_latents = idx.numel() == F_  # sorted and unique: exactly 0..F-1
        self.pos_F = torch.full((F_,), -1, dtype=torch.long, device=device)
        self.pos_F[idx.to(device)] = torch.arange(idx.numel(), device=device)
        W = model.W_dec.detach()
        self.d_model_LD = W[idx.to(device), ref].contiguous()  # d, in the model's dtype
        d_LD = self.d_model_LD.double()
        self.g_ref_L = (d_LD * d_LD).sum(-1)  # ||d||^2 = d . d^ref
        self.g_other_L = (d_LD * W[idx.to(device), other].double()).sum(-1)  # d . d^other
        L = idx.numel()
        # num[:, t]: t = 0 other recon, 1 ref recon, 2 other err, 3 ref err (no add-back yet)
        self.num_L4 = torch.zeros(L, 4, dtype=torch.float64, device=device)
        self.sum_f2_L = torch.zeros(L, dtype=torch.float64, device=device)
        self.n = 0

    def update(self, batch: EncodedBatch) -> None:
        self.n += len(batch.x_BSD)
        codes = batch.codes
        if not self.all_latents:  # entries of the subset, by position (the latents are sorted)
            codes = codes.on_latents(self.pos_F, len(self.latents))
        if codes.latent_E.numel() == 0:
            return
        l_E, v_E = codes.latent_E, codes.value_E
        xhat, x = batch.xhat_BSD, batch.x_BSD
        d_LD = self.d_model_LD.to(xhat.dtype)
        ys = (xhat[:, self.other], xhat[:, self.ref], x[:, self.other] - xhat[:, self.other],
              x[:, self.ref] - xhat[:, self.ref])
        p_E4 = torch.stack([sampled_dot(y.contiguous(), d_LD, codes) for y in ys], dim=1)
        v64 = v_E.double()
        self.num_L4.index_add_(0, l_E, v64[:, None] * p_E4.double())
        self.sum_f2_L.index_add_(0, l_E, v64 * v64)

    def result(self) -> LatentScalingResult:
        num = self.num_L4.clone()
        # Error targets add the latent's own contribution back: d . (f d^m) summed = C * g_m.
        num[:, 2] += self.sum_f2_L * self.g_other_L
        num[:, 3] += self.sum_f2_L * self.g_ref_L
        denom_L = self.g_ref_L * self.sum_f2_L
        beta_L4 = torch.where(
            denom_L[:, None] > 0, num / denom_L.clamp_min(1e-300)[:, None], torch.nan
        )
        scale = self.model.folded_scale_S.detach().double().to(beta_L4.device)
        unit = torch.stack([scale[self.other], scale[self.ref]] * 2) / scale[self.ref]
        beta = (beta_L4 * unit).cpu().numpy()
        return LatentScalingResult(
            latents=self.latents.numpy(),
            ref=self.ref,
            other=self.other,
            beta_other_recon=beta[:, 0],
            beta_ref_recon=beta[:, 1],
            beta_other_err=beta[:, 2],
            beta_ref_err=beta[:, 3],
            sum_f2=self.sum_f2_L.cpu().numpy(),
            n_tokens=self.n,
        )


def latent_scaling(
    model: Crosscoder,
    data: ActivationData,
    latents: Any = None,
    ref: int = 1,
    other: int = 0,
    batch_size: int = 4096,
    progress: bool = True,
) -> LatentScalingResult:
    """Latent Scaling betas for ``latents`` (default: all) in one pass over ``data``
    (a tensor [N, S, D], an ``ActivationStore`` or a store directory)."""
    if latents is None:
        latents = np.arange(model.dict_size)
    acc = LatentScalingAccumulator(model, latents, ref=ref, other=other)
    analysis_pass(model, data, [acc], batch_size, progress=progress, desc="latent scaling")
    return acc.result()


def pick_latents(
    categories: np.ndarray,
    exclusive: str = "chat_only",
    n_control: int | None = None,
    max_latents: int | None = None,
    seed: int = 42,
    score: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The paper's subset: latents labelled ``exclusive`` and a size-matched random sample
    of ``shared`` ones as a control. Returns (exclusive indices, control indices).

    ``max_latents`` keeps the most exclusive ones by ``score`` (highest first; e.g. the
    relative norm for chat-only latents).
    """
    categories = np.asarray(categories).astype(str)
    excl = np.flatnonzero(categories == exclusive)
    if max_latents is not None and excl.size > max_latents:
        order = np.argsort(-np.asarray(score)[excl], kind="stable") if score is not None else None
        excl = np.sort(excl[order[:max_latents]] if order is not None else excl[:max_latents])
    shared = np.flatnonzero(categories == "shared")
    n = excl.size if n_control is None else n_control
    rng = np.random.default_rng(seed)
    control = np.sort(rng.choice(shared, size=min(n, shared.size), replace=False))
    return excl, control


def lstsq_beta(f_N: Tensor, y_ND: Tensor, d_D: Tensor) -> float:
    """Reference: ``argmin_beta sum_n ||y_n - beta f_n d||^2`` by ``torch.linalg.lstsq``."""
    A = (f_N.double()[:, None] * d_D.double()[None, :]).reshape(-1, 1)
    return float(torch.linalg.lstsq(A, y_ND.double().reshape(-1, 1)).solution.item())
