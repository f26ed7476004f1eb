"""The end-of-run summary printed in the terminal."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from crosscoders.pipeline.run import PipelineResult


def _fmt(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def top_chat_only(diff_dir: Path, n: int = 5) -> list[dict[str, Any]]:
    """The most clearly chat-only latents that fire, with their top tokens if known."""
    import pandas as pd

    path = diff_dir / "latents.parquet"
    if not path.exists():
        return []
    df = pd.read_parquet(path)
    chat = df[(df["category"] == "chat_only") & (df.get("freq", 1) > 0)]
    order = "truly_chat_only" if "truly_chat_only" in chat else "rel_norm"
    chat = chat.sort_values([order, "rel_norm"], ascending=False).head(n)
    tokens = _top_tokens(diff_dir)
    return [{"latent": int(r.latent), "rel_norm": float(r.rel_norm),
             "freq": float(getattr(r, "freq", float("nan"))),
             "top_tokens": tokens.get(int(r.latent), [])} for r in chat.itertuples()]


def _top_tokens(diff_dir: Path) -> dict[int, list[str]]:
    path = diff_dir / "top_tokens.json"
    if not path.exists():
        return {}
    return {int(k): v for k, v in json.loads(path.read_text()).items()}


def format_summary(result: PipelineResult) -> str:
    summary_path = result.diff_dir / "summary.json"
    lines = [f"experiment: {result.out}"]
    for name, outcome in result.stages.items():
        lines.append(f"  {name:9s} {outcome.status:8s} {outcome.directory}")
    if summary_path.exists():
        summary = json.loads(summary_path.read_text())
        counts = summary.get("counts", {})
        lines.append("latents: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
        if "alive_counts" in summary:
            lines.append("  firing: " + ", ".join(
                f"{k} {v}" for k, v in summary["alive_counts"].items()))
        fvu = summary.get("fvu", {})
        if fvu:
            lines.append("FVU: " + ", ".join(f"{k} {_fmt(v)}" for k, v in fvu.items()))
        for key in ("l0", "dead_frac"):
            if key in summary:
                lines.append(f"{key}: {_fmt(summary[key])}")
    top = top_chat_only(result.diff_dir)
    if top:
        lines.append("top chat-only latents:")
        for row in top:
            toks = " ".join(repr(t) for t in row["top_tokens"][:8])
            lines.append(f"  #{row['latent']:<6d} rel_norm {row['rel_norm']:.2f} "
                         f"freq {row['freq']:.2g}  {toks}")
    if result.report_path:
        lines.append(f"report: {result.report_path}")
    return "\n".join(lines)
