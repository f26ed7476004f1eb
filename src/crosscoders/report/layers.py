"""The report of a layer study: a layers directory (the ``layers`` stage of ``crosscoders
run``, or ``crosscoders layers --out DIR``) -> one offline HTML file.

It is the diff report's page (``render.py``: the same inlining, feature browser, card,
charts and CSS) with ``static/layers.js`` in place of the diffing sections: FVU per layer,
the decoder-norm profile of every latent as a heat map (latents x layers, sortable by peak
layer and span), persistence histograms, the comparison with per-layer SAEs when present,
and in each card the latent's layer profile and its contexts per layer.

Files and keys are those of :mod:`crosscoders.layers.study` (:class:`LayerFiles`,
:class:`LayerSummary`); a layers directory holds ``layers.parquet`` or ``layers.csv``.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from crosscoders.errors import CrosscodersError, DataError
from crosscoders.io import atomic_write_text, read_json, read_table, unreadable
from crosscoders.layers.examples import layer_of_kind
from crosscoders.layers.study import LAYER_TABLE_FILES, LayerFiles, LayerSummary, check_comparison
from crosscoders.report.data import Example, ReportData, clean_json
from crosscoders.report.load import example_from_stored, find_run_dir, read_metrics
from crosscoders.report.render import build_payload, html_page

#: the page's scripts: the diff report's, with layers.js after sections.js (whose training
#: curves it reuses and whose page it replaces)
LAYER_SCRIPTS = ("data.js", "dom.js", "charts.js", "sections.js", "layers.js", "card.js",
                 "table.js", "main.js")
#: columns of the layer table the page needs (plus ``norm/<layer>`` per layer)
REQUIRED = ("latent", "peak", "span", "first", "last", "effective_layers")
NORM_PREFIX = "norm/"
#: table columns left out of the browser: ``peak_name`` is the category column, and the
#: per-layer norms travel as one matrix (heat map, cards)
HIDDEN = ("peak_name",)
#: viridis at ten evenly spaced points: the heat map's colour scale and the layers' colours
VIRIDIS = ("#440154", "#482878", "#3e4989", "#31688e", "#26828e", "#1f9e89", "#35b779",
           "#6ece58", "#b5de2b", "#fde725")
_FIX = "re-run `crosscoders layers` (or the layers stage of `crosscoders run`) into a new " \
       "directory"


@dataclasses.dataclass
class LayersReportData:
    """Everything the layers report shows.

    - ``table``: the layer table (``LayerProfile.columns``: ``latent``, ``peak``, ``span``,
      ``first``, ``last``, ``effective_layers``, optionally ``freq``, and ``norm/<layer>``
      for every layer), a DataFrame or a dict of columns.
    - ``summary``: the layers ``summary.json`` (``sources`` names the layers in depth order;
      ``fvu`` / ``evaluated`` / ``l0`` when the stage measured them).
    - ``examples``: latent -> its max-activating contexts; ``layer_examples``: latent ->
      {layer name -> the contexts where that layer's input drives it most}.
    - ``comparison``: the JSON of ``crosscoders bench layers``, or None.
    - ``config`` / ``metrics``: the training run's ``run.json`` and ``metrics.jsonl``.
    """

    table: Any
    summary: dict
    examples: dict[int, list[Example]] = dataclasses.field(default_factory=dict)
    layer_examples: dict[int, dict[str, list[Example]]] = dataclasses.field(
        default_factory=dict)
    comparison: dict | None = None
    config: dict = dataclasses.field(default_factory=dict)
    metrics: list[dict] = dataclasses.field(default_factory=list)
    title: str = "Layer study"

    def sources(self) -> list[str]:
        names = self.summary.get("sources")
        if not isinstance(names, list) or not names:
            raise DataError("the layers summary names no layers ('sources'); " + _FIX)
        return [str(n) for n in names]

    def columns(self) -> dict[str, np.ndarray]:
        """The table as 1-D numpy arrays, checked: the required columns and a norm per layer."""
        table = self.table
        if hasattr(table, "columns") and hasattr(table, "to_dict"):
            cols = {str(c): table[c].to_numpy() for c in table.columns}
        else:
            cols = {str(k): np.asarray(v) for k, v in table.items()}
        missing = [c for c in REQUIRED if c not in cols]
        missing += [NORM_PREFIX + s for s in self.sources() if NORM_PREFIX + s not in cols]
        if missing:
            raise DataError(f"the layer table has no column {missing[0]!r}; " + _FIX)
        return cols


def is_layers_dir(path: str | Path) -> bool:
    """Whether ``path`` holds a layer table (and no diff latent table)."""
    from crosscoders.diff.schema import LATENT_FILES

    path = Path(path)
    return (any((path / f).exists() for f in LAYER_TABLE_FILES)
            and not any((path / f).exists() for f in LATENT_FILES))


def load_layers_data(
    layers_dir: str | Path,
    run_dir: str | Path | None = None,
    title: str | None = None,
    *,
    max_examples: int = 20,
    token_strings: Callable[[list[int]], list[str]] | None = None,
) -> LayersReportData:
    """Everything the layers report shows, from ``layers_dir`` and the training run (given,
    or the one the summary records)."""
    layers_dir = Path(layers_dir)
    found = next((layers_dir / f for f in LAYER_TABLE_FILES if (layers_dir / f).exists()), None)
    if found is None:
        raise CrosscodersError(f"{layers_dir} has no layer table ({' or '.join(LAYER_TABLE_FILES)})"
                               "; run `crosscoders layers` first or pass its output directory")
    table = read_table(found, _FIX)
    summary_path = layers_dir / LayerFiles.SUMMARY
    summary = read_json(summary_path, _FIX) if summary_path.exists() else {}
    data = LayersReportData(table, summary)
    data.columns()  # checked now, with the file named above
    if (layers_dir / LayerFiles.EXAMPLES).exists():
        data.examples, data.layer_examples = layer_examples_from_sqlite(
            layers_dir / LayerFiles.EXAMPLES, data.sources(), max_examples, token_strings)
    compare = layers_dir / LayerFiles.COMPARISON
    if compare.exists():
        data.comparison = read_json(compare, _FIX)
        check_comparison(data.comparison, compare)
    run = Path(run_dir) if run_dir is not None else find_run_dir(layers_dir, summary)
    if run is not None:
        if not run.is_dir():
            raise CrosscodersError(f"run directory {run} does not exist; check --run, or leave "
                                   "it out (the layers summary records it)")
        data.metrics = read_metrics(run / "metrics.jsonl")
        for name in ("run.json", "config.json"):
            if (run / name).exists():
                data.config = read_json(run / name, "re-run the step that wrote it")
                break
    data.title = title or f"Layer study · {(run or layers_dir).resolve().name}"
    return data


def layer_examples_from_sqlite(
    path: str | Path, sources: list[str], max_examples: int = 20,
    token_strings: Callable | None = None,
) -> tuple[dict[int, list[Example]], dict[int, dict[str, list[Example]]]]:
    """The contexts of the layers stage's ``examples.db``: (latent -> top contexts, latent ->
    {layer name -> contexts by that layer's input}), each list strongest first."""
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows = con.execute("SELECT latent, kind, value, tokens, acts, text FROM examples "
                           "ORDER BY latent, kind, rank").fetchall()
    except sqlite3.DatabaseError as err:
        raise unreadable(path, "an examples database", err, _FIX) from None
    finally:
        con.close()
    top: dict[int, list[Example]] = {}
    by_layer: dict[int, dict[str, list[Example]]] = {}
    for latent, kind, value, tokens, acts, text in rows:
        layer = layer_of_kind(kind)
        if kind == "top":
            bucket, label = top.setdefault(int(latent), []), None
        elif layer is not None and layer < len(sources):
            bucket = by_layer.setdefault(int(latent), {}).setdefault(sources[layer], [])
            label = f"layer input {value:.3g}"
        else:
            continue
        if len(bucket) >= max_examples:
            continue
        ex = example_from_stored(*(json.loads(v) if v is not None else None
                                   for v in (tokens, text, acts)), token_strings, label)
        if ex is not None and ex.tokens:  # data without token ids has no contexts to show
            bucket.append(ex)
    depth = {name: s for s, name in enumerate(sources)}  # "layer:10" sorts before "layer:2"
    by_layer = {i: dict(sorted(g.items(), key=lambda kv: depth[kv[0]]))
                for i, g in by_layer.items()}
    return top, by_layer


def render_layers_report(data: LayersReportData, out: str | Path, *, max_examples: int = 20,
                         context: tuple[int, int] = (40, 12)) -> Path:
    """Write ``data`` as one HTML file (``out``, or ``out/report.html`` for a directory)."""
    out = Path(out)
    if out.suffix.lower() not in (".html", ".htm"):
        out = out / LayerFiles.REPORT
    payload, chunks = layers_payload(data, max_examples=max_examples, context=context)
    atomic_write_text(out, html_page(payload, chunks, LAYER_SCRIPTS))
    return out


def layers_payload(data: LayersReportData, *, max_examples: int = 20,
                   context: tuple[int, int] = (40, 12)) -> tuple[dict, list[dict]]:
    """The JSON embedded in the page: the diff report's payload over the layer table (the
    peak layer as its category), plus ``layers`` (names, norms, FVU, comparison)."""
    cols = data.columns()
    names = data.sources()
    counted = cols["first"] >= 0
    freq = cols.get("freq")
    uncounted = np.where(freq > 0, "rare", "dead") if freq is not None else "dead"
    peak_names = np.asarray(names, dtype=object)[cols["peak"].astype(np.int64)]
    table = {"latent": cols["latent"], "category": np.where(counted, peak_names, uncounted)}
    table.update({k: v for k, v in cols.items()
                  if k not in table and k not in HIDDEN and not k.startswith(NORM_PREFIX)})
    report = ReportData(latents=table, title=data.title, summary=data.summary,
                        config=data.config, metrics=data.metrics, examples=data.examples,
                        example_groups=data.layer_examples)
    payload, chunks = build_payload(report, max_examples=max_examples, context=context)
    present = set(table["category"].tolist())
    payload["categories"] = [n for n in names if n in present] + [
        c for c in ("rare", "dead") if c in present]
    payload["colors"] = dict(zip(names, layer_colors(len(names))))
    payload["labels"] = {"category": "peak layer"}
    if freq is not None:
        payload["sort"] = ["freq", -1]
    payload["group_title"] = "Contexts by layer input"
    payload["group_note"] = (
        "For each layer s: the contexts where its term x_s · W_enc[s] of the latent's "
        "pre-activation is largest (the value beside each). Shading: the latent's activation.")
    summary = data.summary
    payload["layers"] = {
        "sources": names,
        "norms": [clean_json(cols[NORM_PREFIX + s].astype(np.float64)) for s in names],
        "threshold": summary.get("threshold", 0.5),
        "counted": summary.get("counted"),
        "fvu": clean_json(summary.get(LayerSummary.FVU)),
        "evaluated": clean_json(summary.get(LayerSummary.EVALUATED)),
        "l0": clean_json(summary.get(LayerSummary.L0)),
        "comparison": clean_json(data.comparison, 6) if data.comparison else None,
        "colormap": list(VIRIDIS),
    }
    return payload, chunks


def layer_colors(n: int) -> list[str]:
    """``n`` colours from viridis, deepest layer brightest (the yellow end left out: it is
    hard to see on white)."""
    rgb = np.array([[int(c[i:i + 2], 16) for i in (1, 3, 5)] for c in VIRIDIS], float)
    out = []
    for t in np.linspace(0.0, 0.85, n) if n > 1 else [0.4]:
        x = t * (len(rgb) - 1)
        lo = int(np.floor(x))
        hi = min(lo + 1, len(rgb) - 1)
        c = rgb[lo] + (x - lo) * (rgb[hi] - rgb[lo])
        out.append("#" + "".join(f"{int(round(v)):02x}" for v in c))
    return out


def build_layers_report(
    layers_dir: str | Path,
    run_dir: str | Path | None = None,
    out: str | Path | None = None,
    title: str | None = None,
    *,
    max_examples: int = 20,
    token_strings: Callable[[list[int]], list[str]] | None = None,
) -> Path:
    """Write the HTML report of ``layers_dir`` (default ``layers_dir/report.html``)."""
    data = load_layers_data(layers_dir, run_dir, title, max_examples=max_examples,
                            token_strings=token_strings)
    target = Path(layers_dir) / LayerFiles.REPORT if out is None else out
    return render_layers_report(data, target, max_examples=max_examples)
