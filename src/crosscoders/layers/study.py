"""The layers stage of ``crosscoders run``: everything a one-model, several-layer
experiment writes after training, and its HTML report.

Two passes over the activation store, each of at most ``max_tokens`` rows:

1. the first rows: firing frequencies (as :func:`crosscoders.layers.profile.firing_frequency`
   counts them), hence which latents are counted, and the layer profiles;
2. the held-out rows (the store's evaluation split; the first rows again when it has
   none): FVU per layer, pooled over tokens, ``sum ||x_s - xhat_s||^2 / sum ||x_s -
   mean_s||^2``, and the max-activating contexts of up to ``example_latents`` counted
   latents, overall and per layer (:mod:`crosscoders.layers.examples`).

FVU and L0 are :class:`crosscoders.metrics.ReconstructionMetrics`' (through
:meth:`crosscoders.diff.stats.ActivationStats.summary`), as everywhere else.

Files (:class:`LayerFiles`) and the keys this adds to ``summary.json``
(:class:`LayerSummary`) are what ``crosscoders report LAYERS_DIR`` reads back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from crosscoders.data import RANDOM_ACCESS_FIX, ActivationSource, as_source
from crosscoders.diff.examples import save_examples
from crosscoders.diff.stats import ActivationStats, analysis_pass
from crosscoders.errors import DataError
from crosscoders.io import ensure_dir, read_json, write_json
from crosscoders.layers.examples import LayerExampleCollector, choose_latents
from crosscoders.layers.profile import LayerProfile, layer_profile
from crosscoders.model import Crosscoder


class LayerFiles:
    """The files of a layers directory."""

    TABLE_PARQUET = "layers.parquet"  # one row per latent (LayerProfile.columns)
    TABLE_CSV = "layers.csv"  # the same table as CSV
    SUMMARY = "summary.json"  # LayerProfile.summary plus the keys of LayerSummary
    FIGURE = "layers.png"  # profiles and span histogram (with matplotlib)
    EXAMPLES = "examples.db"  # SQLite, diff.examples.save_examples; kinds top, layer:<s>
    COMPARISON = "comparison.json"  # `crosscoders bench layers --json`, when given
    REPORT = "report.html"


#: the latent table, in the order readers try them
LAYER_TABLE_FILES = (LayerFiles.TABLE_PARQUET, LayerFiles.TABLE_CSV)


class LayerSummary:
    """Keys the layers stage adds to the profile's ``summary.json``."""

    FVU = "fvu"  # {layer name: FVU pooled over the evaluated tokens}
    EVALUATED = "evaluated"  # {"split": "held-out" | "first", "n_tokens": n}
    L0 = "l0"  # active latents per token on the evaluated tokens
    EXAMPLES = "examples"  # {"file", "n_latents", "n_per_latent", "chosen"}
    COMPARISON = "comparison"  # file name of the comparison, when given
    RUN_DIR = "run_dir"  # the crosscoder directory


def run_layer_study(
    model: Crosscoder,
    data: ActivationSource | Tensor,
    out_dir: str | Path,
    *,
    threshold: float = 0.5,
    min_freq: float = 0.0,
    max_tokens: int = 1_000_000,
    example_latents: int = 256,
    n_examples: int = 10,
    tokenizer: Any = None,
    comparison: dict | None = None,
    run_dir: str | Path | None = None,
    title: str | None = None,
    batch_size: int = 4096,
    progress: bool = False,
    window: tuple[int, int] = (16, 4),
) -> LayerProfile:
    """Write the layer profiles, FVU per layer, examples and ``report.html`` to ``out_dir``.

    ``data``: the activation store the crosscoder was trained on (or a tensor [N, S, D],
    or anything else :func:`crosscoders.data.as_source` reads with a known length).
    ``tokenizer`` (``convert_ids_to_tokens``) stores the examples' text; ``comparison`` is
    the result of ``crosscoders bench layers`` (see :func:`read_comparison`).
    """
    from crosscoders.report.layers import build_layers_report

    source = as_source(data)
    if source.n_tokens is None:
        raise DataError("the layers stage reads its data twice and by row, so it needs data "
                        f"of known length; {RANDOM_ACCESS_FIX}")
    out = ensure_dir(out_dir)
    n_tokens = int(source.n_tokens)
    n_first = min(n_tokens, max_tokens)
    firing = ActivationStats(model.dict_size, model.n_sources, model.d_model)
    analysis_pass(model, source, [firing], batch_size, 0, n_first, progress=progress,
                  desc="layers: firing")
    freq_F = firing.per_latent()["freq"]
    profile = layer_profile(model, threshold, freq_F, min_freq)

    n_train = int(getattr(source, "n_train", n_tokens))
    n_eval = int(getattr(source, "n_eval", 0))
    span = (n_train, n_train + min(n_eval, max_tokens)) if n_eval else (0, n_first)
    evaluated = firing if not n_eval else ActivationStats(model.dict_size, model.n_sources,
                                                          model.d_model)
    consumers = [] if evaluated is firing else [evaluated]
    cols = profile.columns
    chosen = choose_latents(cols["peak"], cols["first"] >= 0, freq_F,
                            example_latents if n_examples > 0 else 0)
    collector = LayerExampleCollector(model, chosen, n_examples) if len(chosen) else None
    if collector is not None:
        consumers.append(collector)
    if consumers:
        analysis_pass(model, source, consumers, batch_size, *span, progress=progress,
                      desc="layers: held-out" if n_eval else "layers: examples")

    stats = evaluated.summary()
    summary = profile.summary
    summary[LayerSummary.FVU] = dict(zip(profile.source_names, stats["fvu"]))
    summary[LayerSummary.EVALUATED] = {"split": "held-out" if n_eval else "first",
                                       "n_tokens": span[1] - span[0]}
    summary[LayerSummary.L0] = stats["l0"]
    if run_dir is not None:
        summary[LayerSummary.RUN_DIR] = str(Path(run_dir).resolve())
    if collector is not None:
        records = collector.finish(model, source, *window, tokenizer=tokenizer,
                                   batch_size=batch_size)
        save_examples(records, out / LayerFiles.EXAMPLES, {"sources": profile.source_names})
        summary[LayerSummary.EXAMPLES] = {
            "file": LayerFiles.EXAMPLES, "n_latents": int(len(chosen)),
            "n_per_latent": n_examples,
            "chosen": "the most frequently firing counted latents of each peak layer in turn",
        }
    if comparison is not None:
        write_json(out / LayerFiles.COMPARISON, comparison)
        summary[LayerSummary.COMPARISON] = LayerFiles.COMPARISON
    profile.save(out)
    build_layers_report(out, title=title, max_examples=n_examples)
    return profile


#: what ``crosscoders bench layers --json`` writes and the report draws
COMPARISON_KEYS = ("crosscoder", "per_layer_saes", "matched")
POINT_KEYS = ("k", "l0", "fvu")


def read_comparison(path: str | Path) -> dict:
    """The JSON of ``crosscoders bench layers --json``, checked."""
    fix = "write it with `crosscoders bench layers --json FILE`"
    obj = read_json(path, fix)
    check_comparison(obj, path)
    return obj


def check_comparison(obj: Any, where: str | Path) -> None:
    """Refuse a comparison that lacks what the report draws (a DataError naming it)."""
    fix = "write it with `crosscoders bench layers --json FILE`"
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object from `crosscoders bench layers`; {fix}")
    for key in COMPARISON_KEYS:
        if not isinstance(obj.get(key), list):
            raise DataError(f"{where}: no list {key!r}, so it is not a comparison of "
                            f"`crosscoders bench layers`; {fix}")
    for key in ("crosscoder", "per_layer_saes"):
        for point in obj[key]:
            if not (isinstance(point, dict) and all(
                    isinstance(point.get(k), (int, float)) for k in POINT_KEYS)):
                raise DataError(f"{where}: every entry of {key!r} needs numbers k, l0 and "
                                f"fvu, got {point!r}; {fix}")


def fvu_text(summary: dict) -> str | None:
    """One line of FVU per layer for the terminal, or None when the summary has none."""
    fvu = summary.get(LayerSummary.FVU)
    if not fvu:
        return None
    where = summary.get(LayerSummary.EVALUATED) or {}
    values = [v for v in fvu.values() if isinstance(v, (int, float))]
    shown = ", ".join(f"{k} {v:.3g}" for k, v in fvu.items() if isinstance(v, (int, float)))
    return (f"FVU per layer (on {where.get('n_tokens', '?')} {where.get('split', '?')} "
            f"tokens): {shown}; mean {float(np.mean(values)) if values else float('nan'):.3g}")
