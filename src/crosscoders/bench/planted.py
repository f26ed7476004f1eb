"""Planted-feature ground truth for model diffing: the data generator.

Two "models" (source 0 = base, source 1 = chat) write known feature directions into a
residual stream with sparse, heavy-tailed codes plus noise. The feature kinds are:

- ``shared``: the same unit direction in both models;
- ``shared_rotated``: a unit direction in each model, with cosine in [rotated_cos_min, max];
- ``shared_weaker``: the same direction, but ``weaker_fraction`` times as strong in one
  model (the base for even-numbered ones, the chat for odd ones). L1 training tends to
  shrink the weaker copy to zero and so labels these exclusive; their truth is "shared";
- ``base_only`` / ``chat_only``: present in one model, zero in the other;
- ``shared_shifted``: the same direction, ``1 + c`` times stronger in one model than in the
  other, ``c`` evenly spaced in [shift_min, shift_max] (default 20-70%): stronger in the chat
  for even-numbered ones, in the base for odd ones. The moderate changes a real fine-tune
  makes; the graded diff (``crosscoders.diff.graded``) should call them leaning, not shared.

:func:`make_planted_data` generates the activations and keeps the truth (directions, codes,
kinds); ``crosscoders.bench.synthetic`` scores crosscoders against it. Definitions are in
``docs/synthetic.md``.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from crosscoders.configs import Config
from crosscoders.errors import ConfigError

KINDS: tuple[str, ...] = (
    "shared", "shared_rotated", "shared_weaker", "base_only", "chat_only", "shared_shifted"
)
KIND_TO_CATEGORY: dict[str, str] = {
    "shared": "shared",
    "shared_rotated": "shared",
    "shared_weaker": "shared",
    "base_only": "base_only",
    "chat_only": "chat_only",
    "shared_shifted": "shared",
}
PLANTED_CATEGORIES: tuple[str, ...] = ("shared", "base_only", "chat_only")


@dataclasses.dataclass
class PlantedConfig(Config):
    """What to plant: feature counts per kind, code statistics, noise, size and seed.

    Each feature fires independently on a token with probability ``fire_prob``; when it
    fires its magnitude is log-normal with mean 1 and log-std ``magnitude_sigma``. A shared
    feature has the same magnitude in both models (times ``weaker_fraction`` on the weak side
    of a ``shared_weaker`` one). Directions are random unit vectors, so with fewer dimensions
    than features the data is in superposition.
    """

    d_model: int = 64
    n_shared: int = 48
    n_shared_rotated: int = 16
    n_shared_weaker: int = 32
    n_base_only: int = 16
    n_chat_only: int = 16
    fire_prob: float = 0.03
    magnitude_sigma: float = 0.5
    rotated_cos_min: float = 0.8
    rotated_cos_max: float = 0.95
    weaker_fraction: float = 0.3
    noise_std: float = 0.02
    n_tokens: int = 65536
    seed: int = 0
    n_shared_shifted: int = 0
    shift_min: float = 0.2
    shift_max: float = 0.7

    def validate(self) -> None:
        if self.d_model < 1:
            raise ConfigError(f"d_model={self.d_model} must be at least 1")
        for kind in KINDS:
            if getattr(self, f"n_{kind}") < 0:
                raise ConfigError(f"n_{kind}={getattr(self, f'n_{kind}')} must be >= 0")
        if self.n_features == 0:
            raise ConfigError("no features planted; set at least one of the n_* counts above 0")
        if not 0.0 < self.fire_prob <= 1.0:
            raise ConfigError(f"fire_prob={self.fire_prob} must lie in (0, 1]")
        if self.magnitude_sigma < 0:
            raise ConfigError(f"magnitude_sigma={self.magnitude_sigma} must be >= 0")
        if not 0.0 <= self.rotated_cos_min <= self.rotated_cos_max <= 1.0:
            raise ConfigError(
                f"need 0 <= rotated_cos_min <= rotated_cos_max <= 1, got "
                f"{self.rotated_cos_min} and {self.rotated_cos_max}"
            )
        if not 0.0 < self.weaker_fraction < 1.0:
            raise ConfigError(f"weaker_fraction={self.weaker_fraction} must lie in (0, 1)")
        if self.noise_std < 0:
            raise ConfigError(f"noise_std={self.noise_std} must be >= 0")
        if not 0.0 < self.shift_min <= self.shift_max:
            raise ConfigError(
                f"need 0 < shift_min <= shift_max, got {self.shift_min} and {self.shift_max}"
            )
        if self.n_tokens < 1:
            raise ConfigError(f"n_tokens={self.n_tokens} must be at least 1")

    @property
    def n_features(self) -> int:
        return sum(getattr(self, f"n_{kind}") for kind in KINDS)

    @property
    def kinds(self) -> list[str]:
        """Kind of each planted feature, in generation order."""
        return [kind for kind in KINDS for _ in range(getattr(self, f"n_{kind}"))]


@dataclasses.dataclass
class PlantedData:
    """Planted activations and their ground truth.

    ``acts_NSD[n, s] = sum_p codes_NP[n, p] * directions_PSD[p, s] + noise``. The norm of
    ``directions_PSD[p, s]`` is the feature's strength in model s: 1, ``weaker_fraction``,
    ``1 / (1 + c)`` on the weak side of a shifted feature, or 0 where it is absent.
    """

    acts_NSD: torch.Tensor
    directions_PSD: torch.Tensor
    codes_NP: torch.Tensor
    kinds: list[str]
    categories: list[str]
    config: PlantedConfig

    @property
    def strength_ratio(self) -> np.ndarray:
        """[P] chat strength over base strength (inf for chat-only, 0 for base-only)."""
        n = torch.linalg.vector_norm(self.directions_PSD.double(), dim=-1).numpy()
        with np.errstate(divide="ignore"):
            return n[:, 1] / n[:, 0]


def _unit_rows(n: int, d: int, gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True)


def planted_directions(cfg: PlantedConfig, gen: torch.Generator) -> torch.Tensor:
    """[P, 2, D] float64 directions in ``cfg.kinds`` order (see :class:`PlantedData`)."""
    D = cfg.d_model
    blocks = []
    if cfg.n_shared:
        d = _unit_rows(cfg.n_shared, D, gen)
        blocks.append(torch.stack([d, d], dim=1))
    if cfg.n_shared_rotated:
        n = cfg.n_shared_rotated
        d_base = _unit_rows(n, D, gen)
        u = torch.randn(n, D, generator=gen, dtype=torch.float64)
        u = u - (u * d_base).sum(-1, keepdim=True) * d_base
        u = u / torch.linalg.vector_norm(u, dim=-1, keepdim=True)
        lo, hi = cfg.rotated_cos_min, cfg.rotated_cos_max
        cos = lo + (hi - lo) * torch.rand(n, 1, generator=gen, dtype=torch.float64)
        d_chat = cos * d_base + torch.sqrt(1 - cos**2) * u
        blocks.append(torch.stack([d_base, d_chat], dim=1))
    if cfg.n_shared_weaker:
        n = cfg.n_shared_weaker
        d = _unit_rows(n, D, gen)
        scale_P2 = torch.ones(n, 2, dtype=torch.float64)
        scale_P2[0::2, 0] = cfg.weaker_fraction  # even: weaker in base
        scale_P2[1::2, 1] = cfg.weaker_fraction  # odd: weaker in chat
        blocks.append(d[:, None, :] * scale_P2[:, :, None])
    zeros = torch.zeros
    if cfg.n_base_only:
        d = _unit_rows(cfg.n_base_only, D, gen)
        blocks.append(torch.stack([d, zeros(cfg.n_base_only, D, dtype=d.dtype)], dim=1))
    if cfg.n_chat_only:
        d = _unit_rows(cfg.n_chat_only, D, gen)
        blocks.append(torch.stack([zeros(cfg.n_chat_only, D, dtype=d.dtype), d], dim=1))
    if cfg.n_shared_shifted:
        n = cfg.n_shared_shifted
        d = _unit_rows(n, D, gen)
        scale_P2 = torch.ones(n, 2, dtype=torch.float64)
        for weak, idx in ((0, slice(0, None, 2)), (1, slice(1, None, 2))):  # even: chat stronger
            count = len(range(n)[idx])
            c = torch.linspace(cfg.shift_min, cfg.shift_max, count, dtype=torch.float64)
            scale_P2[idx, weak] = 1.0 / (1.0 + c)
        blocks.append(d[:, None, :] * scale_P2[:, :, None])
    return torch.cat(blocks, dim=0)


def make_planted_data(cfg: PlantedConfig | None = None) -> PlantedData:
    """Generate activations [N, 2, D] (float32) with planted features; same seed, same data."""
    cfg = cfg or PlantedConfig()
    gen = torch.Generator().manual_seed(cfg.seed)
    directions_PSD = planted_directions(cfg, gen)
    P, N = cfg.n_features, cfg.n_tokens
    fires_NP = torch.rand(N, P, generator=gen) < cfg.fire_prob
    sigma = cfg.magnitude_sigma
    magnitude_NP = torch.exp(sigma * torch.randn(N, P, generator=gen) - sigma**2 / 2)
    codes_NP = torch.where(fires_NP, magnitude_NP, torch.zeros(()))
    acts_NSD = torch.einsum("np,psd->nsd", codes_NP, directions_PSD.float())
    if cfg.noise_std > 0:
        acts_NSD += cfg.noise_std * torch.randn(acts_NSD.shape, generator=gen)
    kinds = cfg.kinds
    return PlantedData(
        acts_NSD=acts_NSD.contiguous(),
        directions_PSD=directions_PSD.float(),
        codes_NP=codes_NP,
        kinds=kinds,
        categories=[KIND_TO_CATEGORY[k] for k in kinds],
        config=cfg,
    )
