"""``crosscoders report DIFF_DIR [--run RUN_DIR] [--out report.html]``."""

from __future__ import annotations

import argparse

from crosscoders.errors import CrosscodersError
from crosscoders.io import brief, check_file_path
from crosscoders.report.build import build_report


def add_report_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``report`` options to ``parser`` (see ``docs/report.md``)."""
    parser.add_argument("diff_dir", help="output directory of `crosscoders diff` "
                                         "(latents.parquet, summary.json, examples.db ...)")
    parser.add_argument("--run", dest="run_dir", default=None,
                        help="training run directory (metrics.jsonl, run.json); found "
                             "automatically when the diff dir is inside it")
    parser.add_argument("--out", default=None,
                        help="HTML file to write (default: DIFF_DIR/report.html)")
    parser.add_argument("--title", default=None, help="page title")
    parser.add_argument("--max-examples", type=int, default=20,
                        help="examples kept per latent (default 20)")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer (hub id or local dir, needs transformers) to show "
                             "examples that were stored as token ids only")


def report_from_args(args: argparse.Namespace) -> int:
    """Run ``build_report`` from parsed arguments and print where the report went."""
    if args.out:
        check_file_path(args.out)
    if args.max_examples < 0:
        raise CrosscodersError(f"--max-examples must be >= 0, got {args.max_examples}")
    token_strings = None
    if getattr(args, "tokenizer", None):
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
        except (OSError, ValueError) as err:
            raise CrosscodersError(
                f"could not load the tokenizer {args.tokenizer} ({brief(err)}); give a local "
                "tokenizer directory or a Hugging Face Hub id (owner/name)"
            ) from None
        token_strings = tokenizer.convert_ids_to_tokens
    path = build_report(args.diff_dir, args.run_dir, args.out, args.title,
                        max_examples=args.max_examples, token_strings=token_strings)
    print(f"wrote {path} (open it in a browser; it works offline)")
    return 0
