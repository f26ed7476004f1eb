"""``crosscoders push RUN REPO_ID`` and ``crosscoders export RUN --format F --out DIR``."""

from __future__ import annotations

import argparse


def add_push_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``push`` options to ``parser`` (see ``docs/formats.md``)."""
    parser.add_argument("run_dir", metavar="RUN",
                        help="crosscoder directory (a training run, or Crosscoder.save output)")
    parser.add_argument("repo_id", metavar="REPO_ID",
                        help="Hugging Face Hub repo, owner/name or owner/name/subfolder "
                             "(created if missing)")
    parser.add_argument("--diff", dest="diff_dir",
                        help="also upload this `crosscoders diff` output (the latent table and "
                             "summaries, and its report.html) under diff/")
    parser.add_argument("--report", help="the report to upload with --diff (default: "
                                         "report.html in or beside DIFF_DIR)")
    parser.add_argument("--private", action="store_true",
                        help="create the repo private (an existing repo keeps its visibility)")
    parser.add_argument("--token", help="Hub token (default: HF_TOKEN or `hf auth login`)")
    parser.add_argument("--message", help="commit message")


def push_from_args(args: argparse.Namespace) -> int:
    from crosscoders.formats.hub import push_to_hub
    from crosscoders.model import Crosscoder

    model = Crosscoder.load(args.run_dir)
    url = push_to_hub(model, args.repo_id, run_dir=args.run_dir, diff_dir=args.diff_dir,
                      report=args.report, private=args.private or None, token=args.token,
                      commit_message=args.message)
    print(f"pushed {model.dict_size}-latent crosscoder to {url}")
    print(f'load it with: Crosscoder.from_pretrained("{args.repo_id}")')
    return 0


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``export`` options to ``parser`` (see ``docs/formats.md``)."""
    from crosscoders.formats.export import EXPORTERS

    parser.add_argument("run_dir", metavar="RUN",
                        help="crosscoder directory (or a Hub id owner/name[/subfolder])")
    parser.add_argument("--format", required=True, choices=sorted(EXPORTERS))
    parser.add_argument("--out", required=True, help="directory to write (new or empty)")


def export_from_args(args: argparse.Namespace) -> int:
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
