"""``crosscoders report DIFF_DIR [--run RUN_DIR] [--out report.html]``: the browsable HTML
report (see ``docs/report.md``)."""

from __future__ import annotations

import argparse
from typing import Any

from crosscoders.cli.flags import Field, Option, add_flags, overrides
from crosscoders.errors import CrosscodersError
from crosscoders.io import brief, check_file_path
from crosscoders.pipeline.config import ReportSection

FLAGS = (
    Option("diff_dir", help="output directory of `crosscoders diff` (latents.parquet, "
                            "summary.json, examples.db ...)"),
    Option("--run", dest="run_dir", help="training run directory (metrics.jsonl, run.json); "
                                         "found automatically when the diff dir is inside it"),
    Option("--out", help="HTML file to write (default: DIFF_DIR/report.html)"),
    Field(ReportSection, "title"),
    Field(ReportSection, "max_examples"),
    Option("--tokenizer", help="tokenizer (hub id or local dir, needs transformers) to show "
                               "examples that were stored as token ids only"),
)


def register(sub: Any) -> None:
    p = sub.add_parser("report", help="the browsable HTML report")
    add_flags(p, *FLAGS)
    p.set_defaults(func=run)


def _token_strings(tokenizer_path: str) -> Any:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    except (OSError, ValueError) as err:
        raise CrosscodersError(
            f"could not load the tokenizer {tokenizer_path} ({brief(err)}); give a local "
            "tokenizer directory or a Hugging Face Hub id (owner/name)"
        ) from None
    return tokenizer.convert_ids_to_tokens


def run(args: argparse.Namespace) -> int:
    from crosscoders.report.build import build_report

    if args.out:
        check_file_path(args.out)
    if args.max_examples is not None and args.max_examples < 0:
        raise CrosscodersError(f"--max-examples must be >= 0, got {args.max_examples}")
    section = ReportSection.from_dict(overrides(args, ReportSection, FLAGS))
    token_strings = _token_strings(args.tokenizer) if args.tokenizer else None
    path = build_report(args.diff_dir, args.run_dir, args.out, section.title,
                        max_examples=section.max_examples, token_strings=token_strings)
    print(f"wrote {path} (open it in a browser; it works offline)")
    return 0
