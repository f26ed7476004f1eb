"""The end-of-run summary printed in the terminal."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from crosscoders.diff.schema import (
    CATEGORY,
    DIFF_SCORE,
    FREQ,
    LATENT,
    REL_NORM,
    REL_NORM_Q,
    REL_NORM_Z,
    Files,
    Summary,
)
from crosscoders.io import read_json
from crosscoders.layers.study import fvu_text
from crosscoders.pipeline.run import PipelineResult


def _fmt(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def top_chat_leaning(diff_dir: Path, token_strings: Callable[[list[int]], list[str]] | None,
                     n: int = 5) -> list[dict[str, Any]]:
    """The ``n`` firing latents with the highest relative norm (most chat-specific), with
    their category and the tokens they fire most strongly on."""
    df = _latent_table(diff_dir)
    if df is None:
        return []
    if FREQ in df:
        df = df[df[FREQ] > 0]
    out = []
    for r in df.sort_values(REL_NORM, ascending=False).head(n).to_dict("records"):
        out.append({"latent": int(r[LATENT]), "rel_norm": float(r[REL_NORM]),
                    "category": r[CATEGORY], "freq": float(r.get(FREQ, float("nan"))),
                    "top_tokens": _top_tokens(diff_dir, int(r[LATENT]), token_strings)})
    return out


def top_leaning(diff_dir: Path, token_strings: Callable[[list[int]], list[str]] | None,
                side: str = "chat", n: int = 5) -> list[dict[str, Any]]:
    """The ``n`` latents labelled ``{side}_leaning`` with the highest diffing score (their
    relative norm lies farthest beyond the null), with the tokens they fire most strongly
    on; empty for a table without the graded view."""
    df = _latent_table(diff_dir)
    if df is None or DIFF_SCORE not in df:
        return []
    rows = df[df[CATEGORY] == f"{side}_leaning"].sort_values(DIFF_SCORE, ascending=False)
    out = []
    for r in rows.head(n).to_dict("records"):
        out.append({"latent": int(r[LATENT]), "rel_norm": float(r[REL_NORM]),
                    "z": float(r[REL_NORM_Z]), "q": float(r[REL_NORM_Q]),
                    "freq": float(r.get(FREQ, float("nan"))),
                    "top_tokens": _top_tokens(diff_dir, int(r[LATENT]), token_strings)})
    return out


def _latent_table(diff_dir: Path) -> Any:
    """The diff's latent table (a DataFrame), or None where the diff wrote none."""
    import pandas as pd

    path = diff_dir / Files.LATENTS_PARQUET
    return pd.read_parquet(path) if path.exists() else None


def _top_tokens(diff_dir: Path, latent: int,
                token_strings: Callable[[list[int]], list[str]] | None) -> list[str]:
    """:func:`top_token_ids` as strings (ids as text without a tokenizer); none without
    examples."""
    examples = diff_dir / Files.EXAMPLES
    ids = top_token_ids(examples, latent) if examples.exists() else []
    return token_strings(ids) if token_strings and ids else [str(i) for i in ids]


def top_token_ids(examples_db: Path, latent: int, n: int = 5) -> list[int]:
    """The most frequent tokens among a latent's top-activating examples (centre tokens)."""
    from crosscoders.diff.examples import load_examples

    records = load_examples(examples_db, latent=latent, kind="top")
    centres = [r["tokens"][r["center"]] for r in records
               if r.get("tokens") and r.get("center") is not None]
    return [tok for tok, _ in Counter(centres).most_common(n)]


def _graded_line(graded: dict[str, Any]) -> str:
    """One line on the leaning calls: how many, at what FDR, against which null."""
    text = (f"graded (FDR {graded['fdr']:g}, {graded['n_tested']} latents tested): "
            f"{graded.get('n_chat_leaning', 0)} chat-leaning, "
            f"{graded.get('n_base_leaning', 0)} base-leaning")
    if graded.get("band"):
        lo, hi = graded["band"]
        text += f"; rel_norm in [{lo:.3f}, {hi:.3f}] is within the null"
    if graded.get("note"):
        text += f" ({graded['note']})"
    if graded.get("min_fires") is not None:
        text += (f"; {graded.get('n_dead', 0)} dead and {graded.get('n_rare', 0)} rare "
                 f"(< {graded['min_fires']} firings) latents counted apart")
    return text


def format_summary(result: PipelineResult,
                   token_strings: Callable[[list[int]], list[str]] | None = None) -> str:
    """Counts per category, FVU per model, L0, dead fraction, the leaning calls, the most
    chat-specific and the most chat- and base-leaning latents with their top tokens, and
    where the report is."""
    summary_path = result.diff_dir / Files.SUMMARY
    lines = [f"experiment: {result.out}"]
    for name, outcome in result.stages.items():
        lines.append(f"  {name:9s} {outcome.status:8s} {outcome.directory}")
    if summary_path.exists():
        summary = read_json(summary_path)
        counts = summary.get(Summary.COUNTS, {})
        lines.append("latents: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
        if Summary.ALIVE_COUNTS in summary:
            lines.append("  firing: " + ", ".join(
                f"{k} {v}" for k, v in summary[Summary.ALIVE_COUNTS].items()))
        fvu = summary.get(Summary.FVU, {})
        if fvu:
            lines.append("FVU: " + ", ".join(f"{k} {_fmt(v)}" for k, v in fvu.items()))
        for key, label in ((Summary.L0, "L0"), (Summary.DEAD_FRACTION, "dead fraction")):
            if key in summary:
                lines.append(f"{label}: {_fmt(summary[key])}")
        ls = summary.get(Summary.LATENT_SCALING) or {}
        if "n_truly_chat_only" in ls:
            lines.append(f"truly chat-only (Latent Scaling): {ls['n_truly_chat_only']}")
        graded = summary.get(Summary.GRADED) or {}
        if graded:
            lines.append(_graded_line(graded))
    top = top_chat_leaning(result.diff_dir, token_strings)
    if top:
        lines.append("most chat-specific latents (highest relative decoder norm):")
        for row in top:
            toks = " ".join(repr(t) for t in row["top_tokens"])
            lines.append(f"  #{row['latent']:<6d} {row['category']:12s} rel_norm "
                         f"{row['rel_norm']:.2f} freq {row['freq']:.2g}  fires on: {toks}")
    for side in ("chat", "base"):
        rows = top_leaning(result.diff_dir, token_strings, side)
        if rows:
            lines.append(f"most {side}-leaning latents (farthest beyond the null):")
            for row in rows:
                toks = " ".join(repr(t) for t in row["top_tokens"]) or "(no examples)"
                lines.append(f"  #{row['latent']:<6d} rel_norm {row['rel_norm']:.2f} "
                             f"z {row['z']:+.1f} q {row['q']:.2g} freq {row['freq']:.2g}  "
                             f"fires on: {toks}")
    layers_summary = result.layers_dir / "summary.json"
    if "layers" in result.stages and layers_summary.exists():
        s = read_json(layers_summary)
        spans = ", ".join(f"{k}: {v}" for k, v in s["span_counts"].items())
        lines.append(f"layer profiles: {s['n_counted']} of {s['n_latents']} latents counted "
                     f"({s['counted']})")
        lines.append(f"  span counts (layers >= {s['threshold']} x peak): {spans}")
        lines.append(f"  multi-layer {s['multi_layer_fraction']:.1%}, mean effective layers "
                     f"{s['mean_effective_layers']:.2f}")
        fvu = fvu_text(s)
        if fvu:
            lines.append(fvu)
        lines.append(f"layers: {result.layers_dir}/layers.csv, layers.png")
    if result.report_path:
        lines.append(f"report: {result.report_path}")
    return "\n".join(lines)
