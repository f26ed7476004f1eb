"""``explanations.json`` beside the latent table: reading it and merging it into the table.

The file is a JSON list with one record per explained latent (``latent``, ``category``,
``explanation``, ``detection_score``, ``fuzzing_score``, the confusion counts behind the
scores, the store rows scored, ``skipped`` and ``model``). The latent table written by
``diff`` is never rewritten; :func:`merge_explanations` adds the columns to a loaded copy.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from crosscoders.diff.schema import LATENT
from crosscoders.io import read_json, write_json

EXPLANATIONS_FILE = "explanations.json"
SUMMARY_FILE = "explanations_summary.json"
#: the columns merged into the latent table
COLUMNS = ("explanation", "detection_score", "fuzzing_score")


def read_explanations(diff_dir: str | Path) -> list[dict[str, Any]]:
    """The records of ``diff_dir/explanations.json`` ([] when there is none)."""
    path = Path(diff_dir) / EXPLANATIONS_FILE
    if not path.exists():
        return []
    records = read_json(path, "delete it and run `crosscoders explain` again (cached "
                              "answers make that cheap)")
    return [r for r in records if isinstance(r, dict) and "latent" in r] if isinstance(
        records, list) else []


def write_explanations(diff_dir: str | Path, records: list[dict[str, Any]]) -> Path:
    path = Path(diff_dir) / EXPLANATIONS_FILE
    ordered = sorted(records, key=lambda r: int(r["latent"]))
    write_json(path, json_safe(ordered), indent=1, ensure_ascii=False)
    return path


def merge_explanations(df: Any, diff_dir: str | Path) -> Any:
    """The latent table ``df`` with :data:`COLUMNS` from ``explanations.json`` (NaN / None
    for latents not explained); ``df`` unchanged when there is no such file."""
    records = read_explanations(diff_dir)
    if not records or LATENT not in df.columns:
        return df
    import pandas as pd

    by_latent = {int(r["latent"]): r for r in records}
    out = df.copy()
    ids = [int(i) for i in out[LATENT]]
    present = [c for c in COLUMNS if any(r.get(c) is not None for r in records)]
    for col in present:
        values = [by_latent.get(i, {}).get(col) for i in ids]
        if col == "explanation":
            out[col] = pd.Series(values, index=out.index, dtype=object)
        else:
            out[col] = pd.Series([math.nan if v is None else float(v) for v in values],
                                 index=out.index, dtype=float)
    return out


def json_safe(value: Any) -> Any:
    """JSON-safe: NaN / inf -> None, numpy scalars unwrapped."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
