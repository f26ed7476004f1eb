"""``crosscoders import SRC --out DIR``: a crosscoder saved by another codebase
(dictionary_learning, Kissane, crosscode) as a crosscoders directory (see
``docs/formats.md``)."""

from __future__ import annotations

import argparse
from typing import Any

from crosscoders.cli.flags import Option, add_flags
from crosscoders.cli.shared import SOURCE_NAMES
from crosscoders.errors import CrosscodersError
from crosscoders.formats import FORMATS
from crosscoders.io import check_dir_path

FLAGS = (
    Option("source", help="checkpoint file or directory, or a Hugging Face Hub id "
                          "(owner/name or owner/name/subfolder)"),
    Option("--out", required=True, help="directory to write"),
    Option("--format", default="auto", choices=["auto", *FORMATS],
           help="the codebase that saved it (default: auto, detected from the files)"),
    Option("--scale", type=float, nargs="+",
           help="kissane: the per-model normalisation factors to fold in"),
    Option("--scale-from", help="kissane: estimate those factors from raw activations "
                                "[N, S, D] (.safetensors/.pt/.npy)"),
    SOURCE_NAMES,
)


def register(sub: Any) -> None:
    p = sub.add_parser(
        "import", help="convert a crosscoder saved by another codebase",
        description="Convert a dictionary_learning, Kissane or crosscode crosscoder into a "
                    "crosscoders directory (config.json + model.safetensors) that `diff` and "
                    "`report` read. See docs/formats.md.")
    add_flags(p, *FLAGS)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from crosscoders.formats import detect_format, import_crosscoder
    from crosscoders.formats.hub import resolve

    check_dir_path(args.out)
    source = resolve(args.source)
    name = detect_format(source) if args.format == "auto" else args.format
    options = {"source_names": args.source_names}
    if args.scale or args.scale_from:
        if name != "kissane":
            raise CrosscodersError(
                f"--scale/--scale-from apply to the kissane format only, and {args.source} is "
                f"{name}; drop them (its normalisation is read from the checkpoint)")
        options.update(scale=args.scale, scale_from=args.scale_from)
    model = import_crosscoder(source, format=name, **options)
    model.save(args.out)
    c = model.config
    print(f"imported {name} crosscoder: {c.n_sources} sources x d_model {c.d_model}, "
          f"{c.dict_size} latents, activation {c.activation}"
          + (f" (k={c.k})" if c.activation in ("topk", "batchtopk") else ""))
    print(f"normalisation folded: {model.is_folded}; written to {args.out}")
    return 0
