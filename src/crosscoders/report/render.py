"""ReportData -> one self-contained HTML file (inline CSS, JS and data; no network).

Layout of the embedded data, chosen so that a 16k-latent report opens fast:

- ``<script id="report-data" type="application/json">``: the latent table as columns, run
  config, summary, metrics as columns per split, baselines, and the token strings used by
  examples (``vocab``; examples refer to tokens by index).
- ``<script id="chunk-N" type="application/json">``: the examples (and grouped examples),
  decoder top tokens and activation histograms of ``chunk_size`` consecutive table rows.
  The page parses a chunk only when a card in it is opened, so load time does not grow
  with the example count beyond reading the text.

The plots are inline SVG drawn in the browser, from the table, by the scripts in ``static/``
(``SCRIPTS``: one file per purpose, concatenated in that order into the page's one
``<script>``; they share the namespace object ``CC``). Another page (the layers report,
``report/layers.py``) reuses them with its own sections script in place of the diffing one.
With the graded view (``crosscoders.diff.graded``) the relative-norm plot shades the null
band (``summary.graded.band``), dead and rare latents are left out of the category plots
unless the reader asks for them, and the feature browser opens sorted by ``diff_score``.
"""

from __future__ import annotations

import datetime as _dt
import html
import json
from collections import Counter
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from crosscoders.diff.schema import (
    CATEGORY,
    COLUMNS,
    COS,
    DEC_COS,
    DIFF_SCORE,
    DNORM,
    FREQ,
    LATENT,
    MAX_ACT,
    NORM_BASE,
    NORM_CHAT,
    NU_EPS,
    NU_R,
    REL_NORM,
    TRULY_CHAT_ONLY,
    Files,
)
from crosscoders.io import atomic_write_text
from crosscoders.report.data import Example, ReportData, clean_json, round_sig

# The columns the plots and cards draw, by the role the page's scripts know them by.
PLOT_COLUMNS: dict[str, str] = {
    "rel_norm": REL_NORM, "dnorm": DNORM, "cos": DEC_COS, "n_base": NORM_BASE,
    "n_chat": NORM_CHAT, "freq": FREQ, "max_act": MAX_ACT, "nu_r": NU_R, "nu_eps": NU_EPS,
    "truly_chat_only": TRULY_CHAT_ONLY, "diff_score": DIFF_SCORE,
}
# Preview columns the page adds: the strongest tokens of a latent's examples, and the
# tokens its chat decoder promotes.
TOP_ACT_TOKENS = "top_act_tokens"
PROMOTES = "promotes"
# Shown first, in this order, when present; other columns follow in table order.
PREFERRED_COLUMNS = (LATENT, CATEGORY, DIFF_SCORE, TOP_ACT_TOKENS, PROMOTES, REL_NORM, DNORM,
                     COS, DEC_COS, NORM_BASE, NORM_CHAT, FREQ, MAX_ACT, NU_R, NU_EPS,
                     TRULY_CHAT_ONLY)
# Categories in the order of the relative-norm axis; latents that (nearly) never fired last.
CATEGORY_ORDER = ("base_only", "base_leaning", "shared", "chat_leaning", "chat_only", "other",
                  "rare", "dead")
#: the page's scripts, in the order they run: each reads what the earlier ones put in ``CC``
SCRIPTS = ("data.js", "dom.js", "charts.js", "sections.js", "card.js", "table.js", "main.js")
_TOKEN_MARKERS = {"\u0120": " ", "\u2581": " ", "\u010a": "\n", "\u0109": "\t"}


def render_report(
    data: ReportData,
    out: str | Path,
    *,
    max_examples: int = 20,
    context: tuple[int, int] = (40, 12),
    chunk_size: int = 256,
    n_preview: int = 3,
) -> Path:
    """Write ``data`` as one HTML file and return its path.

    ``out`` is a file path, or a directory (then ``report.html`` in it). Each latent keeps
    at most ``max_examples`` examples, each cut to ``context`` = (tokens before, tokens
    after) its strongest token. ``n_preview`` activating / promoted tokens per latent are
    shown in the table and searched.
    """
    out = Path(out)
    if out.suffix.lower() not in (".html", ".htm"):
        out = out / Files.REPORT
    payload, chunks = build_payload(
        data, max_examples=max_examples, context=context, chunk_size=chunk_size,
        n_preview=n_preview,
    )
    atomic_write_text(out, html_page(payload, chunks))
    return out


def build_payload(
    data: ReportData,
    *,
    max_examples: int = 20,
    context: tuple[int, int] = (40, 12),
    chunk_size: int = 256,
    n_preview: int = 3,
) -> tuple[dict, list[dict]]:
    """The JSON embedded in the page: (main payload, per-chunk card data)."""
    cols = data.columns()
    ids = [int(i) for i in cols[LATENT]]
    vocab = _Vocab()

    examples = {int(k): [_as_example(e) for e in v[:max_examples]]
                for k, v in data.examples.items()}
    groups = {int(k): {str(g): [_as_example(e) for e in exs[:max_examples]]
                       for g, exs in by_group.items()}
              for k, by_group in data.example_groups.items()}
    previews: dict[str, list[str]] = {}
    if examples:
        previews[TOP_ACT_TOKENS] = [
            " · ".join(_top_activating(examples.get(i, []), n_preview)) for i in ids
        ]
    if data.top_tokens:
        previews[PROMOTES] = [
            " · ".join(_promoted(data.top_tokens.get(i, {}), n_preview)) for i in ids
        ]

    table = _table_payload(cols, previews)
    chunks: list[dict] = []
    for start in range(0, len(ids), chunk_size):
        chunk: dict[str, Any] = {}
        for i in ids[start:start + chunk_size]:
            entry: dict[str, Any] = {}
            if i in examples and examples[i]:
                entry["ex"] = [_example_payload(e, context, vocab) for e in examples[i]]
            if groups.get(i):
                entry["exg"] = {g: [_example_payload(e, context, vocab) for e in exs]
                                for g, exs in groups[i].items()}
            if i in data.top_tokens:
                entry["tt"] = {
                    str(model): [[vocab.add(t), round_sig(float(v))] for t, v in pairs]
                    for model, pairs in data.top_tokens[i].items()
                }
            if i in data.act_hists:
                edges, counts = data.act_hists[i]
                entry["hist"] = clean_json([list(edges), list(counts)])
            if entry:
                chunk[str(i)] = entry
        chunks.append(chunk)

    payload = {
        "title": data.title,
        "generated": _dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "n_latents": len(ids),
        "chunk_size": chunk_size,
        "n_chunks": len(chunks),
        "has_examples": bool(examples),
        "has_top_tokens": bool(data.top_tokens),
        "categories": _category_order(cols[CATEGORY]),
        "roles": column_roles(cols),
        "table": table,
        "summary": clean_json(data.summary, 6),
        "config": clean_json(data.config, 6),
        "metrics": _metrics_payload(data.metrics),
        "similarity": clean_json(data.similarity),
        "lens": clean_json(data.lens),
        "vocab": vocab.tokens,
    }
    return payload, chunks


# ------------------------------------------------------------------ pieces
def column_roles(cols: dict[str, np.ndarray]) -> dict[str, str]:
    """Role -> the column playing it (:data:`PLOT_COLUMNS`), for the columns present."""
    return {role: name for role, name in PLOT_COLUMNS.items() if name in cols}


class _Vocab:
    """Interns token strings so examples store small integers."""

    def __init__(self) -> None:
        self.index: dict[str, int] = {}  # shown string -> index
        self.raw: dict[Any, int] = {}  # token as given -> index
        self.tokens: list[str] = []

    def add(self, token: Any) -> int:
        idx = self.raw.get(token)
        if idx is None:
            shown = display_token(token)
            idx = self.index.get(shown)
            if idx is None:
                idx = self.index[shown] = len(self.tokens)
                self.tokens.append(shown)
            self.raw[token] = idx
        return idx

    def add_many(self, tokens: list) -> list[int]:
        raw = self.raw
        try:
            return [raw[t] for t in tokens]  # fast path: all seen before
        except (KeyError, TypeError):
            return [self.add(t) for t in tokens]


def display_token(token: Any) -> str:
    """A token as shown: byte-level BPE / SentencePiece space and newline markers decoded."""
    text = str(token)
    if text and text[0] in _TOKEN_MARKERS:
        text = _TOKEN_MARKERS[text[0]] + text[1:]
    return text.replace("\u010a", "\n")


def _as_example(e: Example | dict | tuple) -> Example:
    if isinstance(e, Example):
        return e
    if isinstance(e, dict):
        return Example(list(e["tokens"]), [float(a) for a in e["acts"]], e.get("label"))
    tokens, acts = e[0], e[1]
    return Example(list(tokens), [float(a) for a in acts])


def _example_payload(e: Example, context: tuple[int, int], vocab: _Vocab) -> list:
    acts = np.asarray(e.acts, dtype=np.float64)
    acts[~np.isfinite(acts)] = 0.0
    peak = int(acts.argmax()) if len(acts) else 0
    lo, hi = max(0, peak - context[0]), min(len(acts), peak + context[1] + 1)
    toks = vocab.add_many(e.tokens[lo:hi])
    nonzero: list = []  # activations are sparse: flat [position, value, ...] pairs
    window = acts[lo:hi]
    for pos in np.flatnonzero(window).tolist():
        nonzero += [pos, float(f"{window[pos]:.3g}")]
    item: list = [toks, nonzero, int(lo > 0), int(hi < len(acts))]
    if e.label:
        item.append(str(e.label))
    return item


def _top_activating(examples: list[Example], n: int) -> list[str]:
    """The most frequent strongest tokens over a latent's examples."""
    counts: Counter[str] = Counter()
    for e in examples:
        if e.acts:
            peak = max(range(len(e.acts)), key=lambda j: e.acts[j] if e.acts[j] == e.acts[j]
                       else -np.inf)
            counts[display_token(e.tokens[peak]).strip() or "␣"] += 1
    return [t for t, _ in counts.most_common(n)]


def _promoted(per_model: dict[str, list], n: int) -> list[str]:
    if not per_model:
        return []
    key = "chat" if "chat" in per_model else next(iter(per_model))
    return [display_token(t).strip() or "␣" for t, _ in per_model[key][:n]]


def _column_kind(name: str, col: np.ndarray) -> str:
    if name == CATEGORY:
        return "cat"
    if col.dtype == bool or (name in COLUMNS and COLUMNS[name].dtype == "bool"
                             and set(np.unique(col[~_isnull(col)])) <= {0, 1}):
        return "bool"
    if np.issubdtype(col.dtype, np.integer):
        return "int"
    if np.issubdtype(col.dtype, np.floating):
        return "num"
    return "str"


def _isnull(col: np.ndarray) -> np.ndarray:
    if np.issubdtype(col.dtype, np.floating):
        return np.isnan(col)
    return np.array([v is None or (isinstance(v, float) and np.isnan(v)) for v in col], bool)


def _table_payload(cols: dict[str, np.ndarray], previews: dict[str, list[str]]) -> dict:
    names = list(cols) + [p for p in previews if p not in cols]
    order = [c for c in PREFERRED_COLUMNS if c in names]
    order += [c for c in names if c not in order]
    columns, values = [], {}
    for name in order:
        if name in previews and name not in cols:
            columns.append({"name": name, "kind": "text"})
            values[name] = previews[name]
            continue
        col = cols[name]
        kind = _column_kind(name, col)
        if kind == "num":
            vals = [round_sig(float(v)) for v in col.astype(np.float64)]
        elif kind == "int":
            vals = col.astype(np.int64).tolist()
        elif kind == "bool":
            vals = [None if n else int(bool(v)) for v, n in zip(col, _isnull(col))]
        else:
            vals = [None if n else str(v) for v, n in zip(col, _isnull(col))]
        columns.append({"name": name, "kind": kind})
        values[name] = vals
    return {"columns": columns, "values": values}


def _category_order(categories: np.ndarray) -> list[str]:
    present = {str(c) for c in categories}
    return [c for c in CATEGORY_ORDER if c in present] + sorted(present - set(CATEGORY_ORDER))


def _metrics_payload(records: list[dict]) -> dict:
    """Trainer records as columns per split: {split: {key: [values aligned with step]}}."""
    by_split: dict[str, list[dict]] = {}
    for rec in records:
        if "step" in rec:
            by_split.setdefault(str(rec.get("split", "train")), []).append(rec)
    out: dict[str, dict[str, list]] = {}
    for split, recs in by_split.items():
        recs.sort(key=lambda r: r["step"])
        keys = sorted({k for r in recs for k, v in r.items()
                       if k != "split" and isinstance(v, (int, float)) and not isinstance(v, bool)})
        out[split] = {k: [clean_json(r.get(k), 5) for r in recs] for k in keys}
    return out


def _json_for_script(obj: Any) -> str:
    """JSON that is safe inside a <script> element (no '</script>' or '<!--')."""
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return text.replace("<", "\\u003c").replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


def _static(name: str) -> str:
    return resources.files("crosscoders.report").joinpath("static", name).read_text("utf-8")


def html_page(payload: dict, chunks: list[dict], scripts: tuple[str, ...] = SCRIPTS) -> str:
    """The page: ``payload`` and ``chunks`` (from :func:`build_payload`) as JSON blocks, the
    CSS and ``scripts`` (files of ``static/``, in order) inline."""
    code = "\n".join(_static(name) for name in scripts)
    chunk_tags = "\n".join(
        f'<script type="application/json" id="chunk-{n}">{_json_for_script(c)}</script>'
        for n, c in enumerate(chunks) if c
    )
    title = html.escape(payload["title"])
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="crosscoders report">
<title>{title}</title>
<style>
{_static("report.css")}
</style>
</head>
<body>
<noscript><p class="noscript">This report needs JavaScript (it runs offline; nothing is
fetched from the network).</p></noscript>
<div id="app"></div>
<script type="application/json" id="report-data">{_json_for_script(payload)}</script>
{chunk_tags}
<script>
{code}
</script>
</body>
</html>
"""
