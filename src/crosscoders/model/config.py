"""The crosscoder's architecture config."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from crosscoders.configs import Config
from crosscoders.errors import ConfigError

ACTIVATIONS = ("relu", "topk", "batchtopk", "jumprelu")


@dataclass
class CrosscoderConfig(Config):
    """Architecture of a crosscoder over ``n_sources`` activation sites of width ``d_model``.

    ``dec_norm`` picks the decoder-norm weight used by the sparsity penalty and the TopK
    ranking: ``"sum"`` is ``sum_s ||W_dec[i, s]||`` (Anthropic's choice, which lets
    source-exclusive latents exist); ``"concat"`` is the norm of the concatenated decoder.
    """

    n_sources: int
    d_model: int
    dict_size: int
    activation: str = "batchtopk"
    k: int | None = 32
    dec_norm: Literal["sum", "concat"] = "sum"
    #: norm of each (latent, source) decoder vector at init; the encoder starts as its
    #: transpose. Results are sensitive to it (Kissane/Nanda); None picks per activation.
    dec_init_norm: float | None = None
    source_names: list[str] | None = None
    #: designated shared latents (Anthropic, Feb 2025): the first n latents have one decoder
    #: vector tied across all sources and a sparsity penalty scaled by shared_sparsity_scale
    n_shared_latents: int = 0
    shared_sparsity_scale: float = 0.15
    #: latents allowed to write to one source only, per source, placed after the shared block
    n_exclusive_latents: list[int] | None = None
    #: cross-layer crosscoders (sources = layers in depth order): "acausal" reads and writes
    #: every layer; "weakly_causal" gives each latent a home layer (contiguous blocks of
    #: dict_size / n_sources latents) that it reads, and it writes that layer and later ones
    causality: Literal["acausal", "weakly_causal"] = "acausal"
    threshold_beta: float = 0.999
    jumprelu_init_threshold: float = 0.1
    jumprelu_bandwidth: float = 2.0
    jumprelu_tanh_scale: float = 4.0
    jumprelu_preact_coeff: float = 3e-6
    seed: int = 0

    def validate(self) -> None:
        for name in ("n_sources", "d_model", "dict_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(
                f"activation: unknown activation {self.activation!r}; choose one of "
                f"{', '.join(ACTIVATIONS)}"
            )
        if self.activation in ("topk", "batchtopk"):
            if self.k is None or not 1 <= self.k <= self.dict_size:
                raise ConfigError(
                    f"k must be between 1 and dict_size={self.dict_size} for "
                    f"activation={self.activation!r}, got k={self.k}"
                )
        if self.dec_init_norm is not None and self.dec_init_norm <= 0:
            raise ConfigError(f"dec_init_norm must be > 0, got {self.dec_init_norm}")
        if self.source_names is not None and len(self.source_names) != self.n_sources:
            raise ConfigError(
                f"source_names has {len(self.source_names)} names but n_sources="
                f"{self.n_sources}; give one name per source"
            )
        n_excl = self.n_exclusive_latents
        if n_excl is not None and (len(n_excl) != self.n_sources or min(n_excl) < 0):
            raise ConfigError(
                f"n_exclusive_latents needs one count >= 0 per source ({self.n_sources}), got "
                f"{n_excl}"
            )
        designated = self.n_shared_latents + sum(n_excl or [])
        if self.n_shared_latents < 0 or designated > self.dict_size:
            raise ConfigError(
                f"n_shared_latents + n_exclusive_latents = {designated} must be between 0 and "
                f"dict_size={self.dict_size}"
            )
        if not 0 < self.shared_sparsity_scale <= 1:
            raise ConfigError(
                f"shared_sparsity_scale must be in (0, 1], got {self.shared_sparsity_scale}"
            )
        if self.causality == "weakly_causal" and (designated or self.n_sources < 2):
            raise ConfigError(
                "causality='weakly_causal' needs n_sources >= 2 (the layers, in depth order) "
                "and no designated shared/exclusive latents"
            )
        if not 0 < self.threshold_beta < 1:
            raise ConfigError(f"threshold_beta must be in (0, 1), got {self.threshold_beta}")

    @property
    def names(self) -> list[str]:
        """Source names (``source_names`` or ``source_0``, ``source_1``, ...)."""
        return self.source_names or [f"source_{s}" for s in range(self.n_sources)]

    @property
    def init_norm(self) -> float:
        if self.dec_init_norm is not None:
            return self.dec_init_norm
        # TopK-style coders are insensitive to scale; L1 coders need small decoders at init
        return 1.0 / self.n_sources**0.5 if self.activation in ("topk", "batchtopk") else 0.1
