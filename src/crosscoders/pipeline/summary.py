"""The end-of-run summary printed in the terminal."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from crosscoders.io import read_json
from crosscoders.layer_study import fvu_text
from crosscoders.pipeline.run import PipelineResult


def _fmt(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def top_chat_leaning(diff_dir: Path, token_strings: Callable[[list[int]], list[str]] | None,
                     n: int = 5) -> list[dict[str, Any]]:
    """The ``n`` firing latents with the highest relative norm (most chat-specific), with
    their category and the tokens they fire most strongly on."""
    import pandas as pd

    path = diff_dir / "latents.parquet"
    if not path.exists():
        return []
    df = pd.read_parquet(path)
    if "freq" in df:
        df = df[df["freq"] > 0]
    rows = df.sort_values("rel_norm", ascending=False).head(n)
    examples = diff_dir / "examples.db"
    out = []
    for r in rows.itertuples():
        ids = top_token_ids(examples, int(r.latent)) if examples.exists() else []
        tokens = token_strings(ids) if token_strings and ids else [str(i) for i in ids]
        out.append({"latent": int(r.latent), "rel_norm": float(r.rel_norm),
                    "category": r.category, "freq": float(getattr(r, "freq", float("nan"))),
                    "top_tokens": tokens})
    return out


def top_leaning(diff_dir: Path, token_strings: Callable[[list[int]], list[str]] | None,
                side: str = "chat", n: int = 5) -> list[dict[str, Any]]:
    """The ``n`` latents labelled ``{side}_leaning`` with the highest diffing score (their
    relative norm lies farthest beyond the null), with the tokens they fire most strongly
    on; empty for a table without the graded view."""
    import pandas as pd

    path = diff_dir / "latents.parquet"
    if not path.exists():
        return []
    df = pd.read_parquet(path)
    if "diff_score" not in df:
        return []
    rows = df[df["category"] == f"{side}_leaning"].sort_values("diff_score", ascending=False)
    examples = diff_dir / "examples.db"
    out = []
    for r in rows.head(n).itertuples():
        ids = top_token_ids(examples, int(r.latent)) if examples.exists() else []
        tokens = token_strings(ids) if token_strings and ids else [str(i) for i in ids]
        out.append({"latent": int(r.latent), "rel_norm": float(r.rel_norm),
                    "z": float(r.rel_norm_z), "q": float(r.rel_norm_q),
                    "freq": float(getattr(r, "freq", float("nan"))), "top_tokens": tokens})
    return out


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
    summary_path = result.diff_dir / "summary.json"
    lines = [f"experiment: {result.out}"]
    for name, outcome in result.stages.items():
        lines.append(f"  {name:9s} {outcome.status:8s} {outcome.directory}")
    if summary_path.exists():
        summary = read_json(summary_path)
        counts = summary.get("counts", {})
        lines.append("latents: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
        if "alive_counts" in summary:
            lines.append("  firing: " + ", ".join(
                f"{k} {v}" for k, v in summary["alive_counts"].items()))
        fvu = summary.get("fvu", {})
        if fvu:
            lines.append("FVU: " + ", ".join(f"{k} {_fmt(v)}" for k, v in fvu.items()))
        for key, label in (("l0", "L0"), ("dead_fraction", "dead fraction")):
            if key in summary:
                lines.append(f"{label}: {_fmt(summary[key])}")
        ls = summary.get("latent_scaling") or {}
        if "n_truly_chat_only" in ls:
            lines.append(f"truly chat-only (Latent Scaling): {ls['n_truly_chat_only']}")
        graded = summary.get("graded") or {}
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
