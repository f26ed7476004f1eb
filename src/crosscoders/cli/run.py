"""``crosscoders run CONFIG.yaml``: every stage of one experiment; unchanged stages are not
redone and an interrupted run continues where it stopped."""

from __future__ import annotations

import argparse
import os
from typing import Any

from crosscoders.cli.flags import Option, add_flags
from crosscoders.cli.shared import NO_PROGRESS
from crosscoders.io import check_dir_path

FLAGS = (
    Option("config", help="pipeline YAML (see `crosscoders init`)"),
    Option("--out", help="override the config's output directory"),
    NO_PROGRESS,
)


def register(sub: Any) -> None:
    p = sub.add_parser("run", help="run a whole experiment from one YAML config",
                       description="Run every stage; unchanged stages are not redone and an "
                                   "interrupted run continues where it stopped.")
    add_flags(p, *FLAGS)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from crosscoders.pipeline import PipelineConfig, run_pipeline
    from crosscoders.pipeline.summary import format_summary

    config = PipelineConfig.load(args.config)  # every key checked before any work
    if args.out:
        config = config.replace(out=args.out)
    check_dir_path(config.out, "--out" if args.out else f"{args.config}: out:")
    result = run_pipeline(config, progress=not args.no_progress)
    if os.environ.get("RANK", "0") != "0":  # under torchrun only rank 0 ran every stage
        return 0
    print(format_summary(result, result.token_strings()))
    return 0
