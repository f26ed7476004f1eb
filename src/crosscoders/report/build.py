"""``build_report``: diffing or layers output (+ training run) on disk -> one HTML file."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from crosscoders.diff.schema import Files
from crosscoders.report.layers import build_layers_report, is_layers_dir
from crosscoders.report.load import load_report_data
from crosscoders.report.render import render_report


def build_report(
    diff_dir: str | Path,
    run_dir: str | Path | None = None,
    out: str | Path | None = None,
    title: str | None = None,
    *,
    max_examples: int = 20,
    token_strings: Callable[[list[int]], list[str]] | None = None,
) -> Path:
    """Write the HTML report of ``diff_dir`` (default ``diff_dir/report.html``); return its path.

    ``run_dir`` (training run: ``metrics.jsonl``, ``run.json``) is found automatically when
    the diff summary names it or the diff dir sits inside it. See ``docs/report.md``. A
    layers directory (``layers.parquet`` / ``layers.csv``, no latent table) gets the layers
    report instead (:func:`crosscoders.report.layers.build_layers_report`).
    """
    if is_layers_dir(diff_dir):
        return build_layers_report(diff_dir, run_dir, out, title, max_examples=max_examples,
                                   token_strings=token_strings)
    data = load_report_data(diff_dir, run_dir, title, max_examples=max_examples,
                            token_strings=token_strings)
    return render_report(data, Path(diff_dir) / Files.REPORT if out is None else out,
                         max_examples=max_examples)
