"""Per-latent decoder-norm statistics and shared / base-only / chat-only labels.

Two conventions map a latent's per-source decoder norms to a score in [0, 1], both oriented
so that 0 = base-only, 0.5 = shared, 1 = chat-only:

- ``rel_norm`` (Anthropic, Kissane): ``r = n_chat / (n_base + n_chat)``.
- ``minder`` (Minder et al. 2025): ``dnorm = 0.5 * (1 + (n_chat - n_base) / max(n_base, n_chat))``.
  The published Minder code orients it the other way (0 = chat-only); we flip it so that both
  conventions read alike.

With ``q = n_base / n_chat <= 1`` the scores are ``r = 1 / (1 + q)`` and ``dnorm = 1 - q / 2``,
so the same norm ratio lands at different places on the two scales (a 0.3x weaker copy gives
r = 0.77 but dnorm = 0.85). A latent whose decoder norms are both zero scores 0.5 on both
scales (no evidence either way) instead of NaN.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np
import torch

from crosscoders.configs import Config
from crosscoders.errors import ConfigError, CrosscodersError, DataError

CATEGORIES: tuple[str, ...] = ("shared", "base_only", "chat_only", "other")
Convention = Literal["rel_norm", "minder"]


def _as_tensor(W_dec_FSD: torch.Tensor | np.ndarray) -> torch.Tensor:
    W = torch.as_tensor(W_dec_FSD)
    if W.ndim != 3:
        raise DataError(
            f"expected a decoder of shape [F, S, D], got shape {tuple(W.shape)}; pass model.W_dec"
        )
    return W.detach().to(torch.float64) if not W.is_floating_point() else W.detach()


def _check_sources(W_dec_FSD: torch.Tensor, base: int, chat: int) -> None:
    n_sources = W_dec_FSD.shape[1]
    for name, idx in (("base", base), ("chat", chat)):
        if not -n_sources <= idx < n_sources:
            raise CrosscodersError(
                f"{name}={idx} is not a source index; the decoder has {n_sources} (use 0.."
                f"{n_sources - 1})"
            )
    if base % n_sources == chat % n_sources:
        raise CrosscodersError(
            f"base and chat must be different sources, got {base} and {chat}; pick two different "
            "source indices"
        )


def decoder_norms(W_dec_FSD: torch.Tensor | np.ndarray) -> torch.Tensor:
    """L2 norm of each latent's decoder vector in each source: [F, S, D] -> [F, S]."""
    return torch.linalg.vector_norm(_as_tensor(W_dec_FSD), dim=-1)


def relative_norm(
    W_dec_FSD: torch.Tensor | np.ndarray, base: int = 0, chat: int = 1
) -> torch.Tensor:
    """``r = n_chat / (n_base + n_chat)`` per latent, [F]; 0.5 where both norms are 0."""
    W = _as_tensor(W_dec_FSD)
    _check_sources(W, base, chat)
    norms_FS = decoder_norms(W)
    n_base, n_chat = norms_FS[:, base], norms_FS[:, chat]
    total = n_base + n_chat
    r = n_chat / total.clamp_min(torch.finfo(total.dtype).tiny)
    return torch.where(total > 0, r, torch.full_like(r, 0.5))


def minder_norm_diff(
    W_dec_FSD: torch.Tensor | np.ndarray, base: int = 0, chat: int = 1
) -> torch.Tensor:
    """``0.5 * (1 + (n_chat - n_base) / max(n_base, n_chat))`` per latent, [F].

    Oriented so that 1 = chat-only (the published code uses 1 = base-only); 0.5 where both
    norms are 0.
    """
    W = _as_tensor(W_dec_FSD)
    _check_sources(W, base, chat)
    norms_FS = decoder_norms(W)
    n_base, n_chat = norms_FS[:, base], norms_FS[:, chat]
    biggest = torch.maximum(n_base, n_chat)
    d = 0.5 * (1 + (n_chat - n_base) / biggest.clamp_min(torch.finfo(biggest.dtype).tiny))
    return torch.where(biggest > 0, d, torch.full_like(d, 0.5))


def decoder_cosine(
    W_dec_FSD: torch.Tensor | np.ndarray, base: int = 0, chat: int = 1
) -> torch.Tensor:
    """Cosine between each latent's base and chat decoder vectors, [F]; 0 if either is zero."""
    W = _as_tensor(W_dec_FSD)
    _check_sources(W, base, chat)
    d_base, d_chat = W[:, base], W[:, chat]
    denom = torch.linalg.vector_norm(d_base, dim=-1) * torch.linalg.vector_norm(d_chat, dim=-1)
    cos = (d_base * d_chat).sum(-1) / denom.clamp_min(torch.finfo(denom.dtype).tiny)
    return torch.where(denom > 0, cos, torch.zeros_like(cos))


@dataclasses.dataclass
class CategoryThresholds(Config):
    """Cut-offs on a [0, 1] score (0 = base-only, 1 = chat-only) that label a latent.

    ``score < base_only_below`` -> base_only; ``score > chat_only_above`` -> chat_only;
    ``shared_low <= score <= shared_high`` -> shared; anything else -> other.
    """

    convention: Convention = "rel_norm"
    base_only_below: float = 0.05
    chat_only_above: float = 0.95
    shared_low: float = 0.05
    shared_high: float = 0.95

    def validate(self) -> None:
        for field in ("base_only_below", "chat_only_above", "shared_low", "shared_high"):
            value = getattr(self, field)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"{field}={value} must lie in [0, 1]")
        if not self.base_only_below <= self.shared_low <= self.shared_high:
            raise ConfigError(
                f"need base_only_below <= shared_low <= shared_high, got {self.base_only_below}, "
                f"{self.shared_low}, {self.shared_high}; reorder the thresholds"
            )
        if not self.shared_high <= self.chat_only_above:
            raise ConfigError(
                f"need shared_high <= chat_only_above, got {self.shared_high} > "
                f"{self.chat_only_above}; lower shared_high or raise chat_only_above"
            )


PRESETS: dict[str, CategoryThresholds] = {
    # Anthropic (2024): exclusive beyond 0.05 / 0.95; everything in between is shared.
    "anthropic": CategoryThresholds("rel_norm", 0.05, 0.95, 0.05, 0.95),
    # Kissane et al. define only shared (0.3 < r < 0.7); the 0.1 / 0.9 exclusive cut-offs are ours.
    "kissane": CategoryThresholds("rel_norm", 0.1, 0.9, 0.3, 0.7),
    # Minder et al. (2025): on dnorm, chat-only > 0.9, base-only < 0.1, shared in [0.4, 0.6].
    "minder": CategoryThresholds("minder", 0.1, 0.9, 0.4, 0.6),
}


def get_thresholds(preset: str | CategoryThresholds) -> CategoryThresholds:
    """Resolve a preset name (``anthropic``, ``kissane``, ``minder``) or pass thresholds through."""
    if isinstance(preset, CategoryThresholds):
        return preset
    if preset not in PRESETS:
        raise ConfigError(
            f"unknown category preset {preset!r}; use one of {sorted(PRESETS)} "
            "or a CategoryThresholds"
        )
    return PRESETS[preset]


def category_score(
    W_dec_FSD: torch.Tensor | np.ndarray,
    base: int = 0,
    chat: int = 1,
    convention: Convention = "rel_norm",
) -> torch.Tensor:
    """The [F] score used for labels: ``relative_norm`` or ``minder_norm_diff``."""
    if convention == "rel_norm":
        return relative_norm(W_dec_FSD, base, chat)
    if convention == "minder":
        return minder_norm_diff(W_dec_FSD, base, chat)
    raise ConfigError(f"unknown convention {convention!r}; use 'rel_norm' or 'minder'")


def labels_from_scores(
    score_F: torch.Tensor | np.ndarray, thresholds: CategoryThresholds
) -> np.ndarray:
    """Map [F] scores to labels in ``CATEGORIES`` (a numpy array of str)."""
    s = np.asarray(torch.as_tensor(score_F).detach().cpu().numpy(), dtype=np.float64)
    t = thresholds
    labels = np.full(s.shape, "other", dtype=object)
    labels[(s >= t.shared_low) & (s <= t.shared_high)] = "shared"
    labels[s < t.base_only_below] = "base_only"
    labels[s > t.chat_only_above] = "chat_only"
    return labels.astype(str)


def classify_latents(
    W_dec_FSD: torch.Tensor | np.ndarray,
    base: int = 0,
    chat: int = 1,
    preset: str | CategoryThresholds = "minder",
) -> np.ndarray:
    """Label each latent ``shared``, ``base_only``, ``chat_only`` or ``other`` from its decoder.

    ``preset`` is a name in ``PRESETS`` or a ``CategoryThresholds``; the score is the
    preset's convention. Returns a numpy array of F strings.
    """
    thresholds = get_thresholds(preset)
    score_F = category_score(W_dec_FSD, base, chat, thresholds.convention)
    return labels_from_scores(score_F, thresholds)
