"""``crosscoders demo``: the built-in model-organism experiment (the ``demo`` example
config), end to end."""

from __future__ import annotations

import argparse
from typing import Any

from crosscoders.cli.flags import Option, add_flags
from crosscoders.cli.shared import NO_PROGRESS
from crosscoders.io import check_dir_path

FLAGS = (
    Option("--out", default="runs/demo", help="output directory (default: runs/demo)"),
    NO_PROGRESS,
)


def register(sub: Any) -> None:
    p = sub.add_parser("demo", help="the built-in model-organism experiment, end to end")
    add_flags(p, *FLAGS)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from crosscoders.pipeline import run_pipeline
    from crosscoders.pipeline.examples import load_example
    from crosscoders.pipeline.summary import format_summary

    check_dir_path(args.out)
    config = load_example("demo").replace(out=args.out)
    result = run_pipeline(config, progress=not args.no_progress)
    print(format_summary(result, result.token_strings()))
    return 0
