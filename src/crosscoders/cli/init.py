"""``crosscoders init [--example NAME] [--out FILE]``: write a commented starting config."""

from __future__ import annotations

import argparse
from typing import Any

from crosscoders.cli.flags import Option, add_flags
from crosscoders.errors import CrosscodersError
from crosscoders.io import atomic_write_text, check_file_path
from crosscoders.pipeline.examples import EXAMPLES

FLAGS = (
    Option("--example", choices=sorted(EXAMPLES), default="smollm2",
           help="which example (default: smollm2)"),
    Option("--out", default="crosscoders.yaml", help="file to write (default: "
                                                     "crosscoders.yaml)"),
    Option("--force", action="store_true", help="overwrite an existing file"),
)


def register(sub: Any) -> None:
    p = sub.add_parser("init", help="write a commented starting config")
    add_flags(p, *FLAGS)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from crosscoders.pipeline.examples import example_text

    out = check_file_path(args.out)
    if out.exists() and not args.force:
        raise CrosscodersError(f"{out} exists; pass --force to overwrite it or choose --out")
    atomic_write_text(out, example_text(args.example))
    print(f"wrote {out}; edit it, then: crosscoders run {out}")
    return 0
