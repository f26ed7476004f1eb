"""Activation sites: parse ``"resid_out:0.5"``-style names and resolve them to a block."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from crosscoders.errors import ConfigError

SiteKind = Literal["resid_out", "resid_in"]
KINDS: tuple[str, ...] = ("resid_out", "resid_in")
_ALIASES = {
    "out": "resid_out",
    "in": "resid_in",
    "resid_post": "resid_out",
    "resid_pre": "resid_in",
}


@dataclass(frozen=True)
class Site:
    """A resolved site: the residual stream entering (``resid_in``) or leaving a block."""

    kind: SiteKind
    layer: int  # 0-based block index, in range

    @property
    def name(self) -> str:
        return f"{self.kind}:{self.layer}"

    @property
    def last_block(self) -> int:
        """Last block that must run to produce this site."""
        return self.layer if self.kind == "resid_out" else self.layer - 1


def parse_site(text: str | int | float) -> tuple[SiteKind, int | float]:
    """Split ``"kind:layer"`` (kind optional, default ``resid_out``) into kind and layer.

    A layer written with a dot is a fraction of depth (``0.5``); otherwise an index.
    """
    raw = str(text).strip()
    kind, _, layer_text = raw.rpartition(":")
    kind = _ALIASES.get(kind, kind) or "resid_out"
    if kind not in KINDS:
        raise ConfigError(f"site {raw!r}: unknown kind {kind!r}; use one of {', '.join(KINDS)}")
    try:
        layer: int | float = float(layer_text) if "." in layer_text else int(layer_text)
    except ValueError:
        raise ConfigError(
            f"site {raw!r}: layer {layer_text!r} is not an index (e.g. 12, -1) or a fraction "
            "of depth (e.g. 0.5)"
        ) from None
    return kind, layer  # type: ignore[return-value]


def resolve_site(text: str | int | float, n_layers: int, model: str = "model") -> Site:
    """Resolve a site name against a model with ``n_layers`` blocks.

    Fractions map to ``min(floor(f * n_layers), n_layers - 1)``: ``0.5`` of 6 blocks is
    block 3, ``1.0`` the last block. Negative indices count from the end.
    """
    kind, layer = parse_site(text)
    if isinstance(layer, float):
        if not 0.0 <= layer <= 1.0:
            raise ConfigError(
                f"site {text!r} of {model}: fraction of depth {layer} is outside [0, 1]"
            )
        index = min(int(layer * n_layers), n_layers - 1)
    else:
        index = layer + n_layers if layer < 0 else layer
        if not 0 <= index < n_layers:
            raise ConfigError(
                f"site {text!r} of {model}: layer {layer} is out of range; the model has "
                f"{n_layers} blocks (use 0..{n_layers - 1}, -1 for the last, or 0.5 for the middle)"
            )
    return Site(kind, index)  # type: ignore[arg-type]
