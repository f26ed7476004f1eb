"""``crosscoders push RUN REPO_ID``: upload a crosscoder (and its diff) to the Hugging Face
Hub with a model card (see ``docs/formats.md``)."""

from __future__ import annotations

import argparse
from typing import Any

from crosscoders.cli.flags import Option, add_flags

FLAGS = (
    Option("run_dir", metavar="RUN",
           help="crosscoder directory (a training run, or Crosscoder.save output)"),
    Option("repo_id", metavar="REPO_ID",
           help="Hugging Face Hub repo, owner/name or owner/name/subfolder (created if "
                "missing)"),
    Option("--diff", dest="diff_dir",
           help="also upload this `crosscoders diff` output (the latent table and summaries, "
                "and its report.html) under diff/"),
    Option("--report", help="the report to upload with --diff (default: report.html in or "
                            "beside DIFF_DIR)"),
    Option("--private", action="store_true",
           help="create the repo private (an existing repo keeps its visibility)"),
    Option("--token", help="Hub token (default: HF_TOKEN or `hf auth login`)"),
    Option("--message", help="commit message"),
)


def register(sub: Any) -> None:
    p = sub.add_parser("push", help="upload a crosscoder (and its diff) to the Hugging Face "
                                    "Hub with a model card")
    add_flags(p, *FLAGS)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from crosscoders.formats.hub import push_to_hub
    from crosscoders.model import Crosscoder

    model = Crosscoder.load(args.run_dir)
    url = push_to_hub(model, args.repo_id, run_dir=args.run_dir, diff_dir=args.diff_dir,
                      report=args.report, private=args.private or None, token=args.token,
                      commit_message=args.message)
    print(f"pushed {model.dict_size}-latent crosscoder to {url}")
    print(f'load it with: Crosscoder.from_pretrained("{args.repo_id}")')
    return 0
