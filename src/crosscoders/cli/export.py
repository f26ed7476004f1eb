"""``crosscoders export RUN --format F --out DIR``: a crosscoder in another codebase's format
(dictionary_learning, crosscode; see ``docs/formats.md``)."""

from __future__ import annotations

import argparse
from typing import Any

from crosscoders.cli.flags import Option, add_flags
from crosscoders.formats.export import EXPORTERS

FLAGS = (
    Option("run_dir", metavar="RUN",
           help="crosscoder directory (or a Hub id owner/name[/subfolder])"),
    Option("--format", required=True, choices=sorted(EXPORTERS), help="the format to write"),
    Option("--out", required=True, help="directory to write (new or empty)"),
)


def register(sub: Any) -> None:
    p = sub.add_parser("export", help="write a crosscoder in another codebase's format "
                                      "(dictionary_learning, crosscode)")
    add_flags(p, *FLAGS)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from crosscoders.formats.export import check_output, export_crosscoder
    from crosscoders.model import Crosscoder

    check_output(args.out)  # before loading (or downloading) anything
    model = Crosscoder.load(args.run_dir)
    notes = export_crosscoder(model, args.format, args.out)
    for note in notes:
        print(f"note: {note}")
    print(f"exported {model.config.activation} crosscoder ({model.dict_size} latents) as "
          f"{args.format} to {args.out}")
    return 0
