"""What a report shows, as plain Python data (no file formats here; see ``load.py``).

Every field but ``latents`` is optional: a section whose data is missing is left out of the
page, so a report can be built from a latent table alone.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from crosscoders.diff.schema import check_columns
from crosscoders.errors import CrosscodersError

Token = str
TokenScore = tuple[str, float]


@dataclasses.dataclass
class Example:
    """One context: its tokens (decoded strings) and the latent's activation on each."""

    tokens: list[str]
    acts: list[float]
    label: str | None = None  # e.g. "chat" / "base" or a document id; shown beside the example

    def __post_init__(self) -> None:
        if len(self.tokens) != len(self.acts):
            raise CrosscodersError(
                f"an example has {len(self.tokens)} tokens but {len(self.acts)} activations; "
                "they must have one activation per token"
            )


@dataclasses.dataclass
class ReportData:
    """Everything the HTML report shows.

    - ``latents``: per-latent table, a pandas DataFrame or a dict of equal-length columns,
      named as ``crosscoders diff`` names them (``crosscoders.diff.schema``). Needs
      ``latent`` (int id) and ``category``; the columns the plots use when present:
      ``rel_norm`` (else ``dnorm``), ``dec_cos``, ``norm_base``, ``norm_chat``, ``freq``,
      ``max_act``, ``nu_r``, ``nu_eps``, ``truly_chat_only``, ``diff_score``. Any other
      column is shown in the browser and sortable.
    - ``summary``: JSON-able dict (thresholds, preset, counts, sources ...), shown as is.
    - ``config``: the run's configuration (``run.json`` / ``config.json``), shown as is.
    - ``metrics``: trainer records (``step``, ``split``, ``loss``, ``fvu/<source>`` ...).
    - ``examples``: latent id -> max-activating examples, strongest first.
    - ``example_groups``: latent id -> {group name -> examples}: further contexts shown by
      group in the card (the layers report: by the layer whose input drives the latent).
    - ``similarity``: holistic baselines, e.g. ``{"cka": 0.93, "svcca": 0.88}`` or nested
      dicts ``{"cka": {"layer 13": 0.93}}``.
    - ``lens``: activation-difference lens, a list of ``{"position": p, "promoted":
      [(tok, logit), ...], "suppressed": [...], "norm": float}`` (any of the keys optional).
    - ``top_tokens``: latent id -> {model name -> [(token, logit), ...]}: what each decoder
      vector promotes through that model's unembedding, strongest first.
    - ``act_hists``: latent id -> (bin_edges, counts) of the latent's non-zero activations;
      when missing, the card histograms the activations of the shown examples instead.
    """

    latents: Any
    title: str = "Crosscoder report"
    summary: dict = dataclasses.field(default_factory=dict)
    config: dict = dataclasses.field(default_factory=dict)
    metrics: list[dict] = dataclasses.field(default_factory=list)
    examples: dict[int, list[Example]] = dataclasses.field(default_factory=dict)
    example_groups: dict[int, dict[str, list[Example]]] = dataclasses.field(default_factory=dict)
    similarity: dict = dataclasses.field(default_factory=dict)
    lens: list[dict] = dataclasses.field(default_factory=list)
    top_tokens: dict[int, dict[str, list[TokenScore]]] = dataclasses.field(default_factory=dict)
    act_hists: dict[int, tuple[Sequence[float], Sequence[float]]] = dataclasses.field(
        default_factory=dict
    )

    def columns(self) -> dict[str, np.ndarray]:
        """The latent table as a dict of 1-D numpy arrays, checked."""
        table = self.latents
        if hasattr(table, "to_dict") and hasattr(table, "columns"):  # pandas DataFrame
            cols = {str(c): table[c].to_numpy() for c in table.columns}
        elif isinstance(table, Mapping):
            cols = {str(k): np.asarray(v) for k, v in table.items()}
        else:
            raise CrosscodersError(
                f"ReportData.latents must be a pandas DataFrame or a dict of columns, "
                f"got {type(table).__name__}"
            )
        check_columns(cols, "the latent table")
        lengths = {name: len(col) for name, col in cols.items()}
        if len(set(lengths.values())) > 1:
            raise CrosscodersError(f"latent table columns differ in length: {lengths}")
        return cols


def clean_json(value: Any, digits: int = 4) -> Any:
    """JSON-safe copy of ``value``: numpy scalars unwrapped, NaN/inf -> None, floats rounded
    to ``digits`` significant digits (keeps the embedded data compact)."""
    if isinstance(value, Mapping):
        return {str(k): clean_json(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean_json(v, digits) for v in value]
    if isinstance(value, np.ndarray):
        return clean_json(value.tolist(), digits)
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, (np.integer, int)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        return round_sig(float(value), digits)
    if value is None or isinstance(value, str):
        return value
    return str(value)


def round_sig(x: float, digits: int = 4) -> float | None:
    """``x`` rounded to ``digits`` significant digits; None for NaN/inf."""
    if not math.isfinite(x):
        return None
    if x == 0:
        return 0
    r = round(x, digits - 1 - int(math.floor(math.log10(abs(x)))))
    return int(r) if r == int(r) and abs(r) < 2**53 else r
