"""Command line: a thin layer over the library functions, one module per command.

    crosscoders run CONFIG.yaml          the whole experiment (harvest, train, diff, report)
    crosscoders demo                     the built-in model-organism experiment
    crosscoders init [--example NAME]    write a commented starting config
    crosscoders harvest | train | diff | report    one stage at a time
    crosscoders bench synthetic | diffing | layers   ground-truth benchmarks
    crosscoders import SRC --out DIR     a crosscoder saved by another codebase
    crosscoders export RUN --format F --out DIR    ... and the other way round
    crosscoders push RUN REPO_ID         upload to the Hugging Face Hub with a model card
    crosscoders layers RUN --out DIR     layer profiles of a cross-layer crosscoder
    crosscoders explain DIFF --latents chat_only   LLM explanations of latents, scored

Each command module has ``register(subparsers)`` and ``run(args) -> exit code``; its flags are
declared with :mod:`crosscoders.cli.flags`, most of them generated from config fields.
"""

from __future__ import annotations

import argparse
import datetime
import errno
import importlib
import os
import shlex
import sys
import tempfile
import traceback
import typing
from collections.abc import Sequence
from pathlib import Path

from crosscoders.errors import CrosscodersError, TrainingDiverged
from crosscoders.io import atomic_write_text, brief

#: the command modules, in the order ``crosscoders --help`` lists them
COMMANDS = ("run", "demo", "init", "train", "bench", "harvest", "diff", "report", "layers",
            "explain", "import_", "push", "export")


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line that names the fix, like every other
    error of the command line (exit code 2)."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"error: {_one_line(message)}; see `{self.prog} --help`\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="crosscoders",
                    description="Train crosscoders and use them to diff models.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"crosscoders.cli.{name}").register(sub)
    return parser


def _quiet_libraries() -> None:
    """--no-progress also silences transformers' own loading bars."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    hf_logging.disable_progress_bar()


#: an OSError with one of these errnos is a problem with a path the user gave: the fix
_OS_FIXES = {
    errno.ENOENT: "check the path",
    errno.EEXIST: "a file is in the way of a directory; choose another path or move it",
    errno.ENOTDIR: "a file is in the way of a directory; choose another path or move it",
    errno.EISDIR: "it is a directory where a file is needed; give a file path",
    errno.EACCES: "choose a location you can read/write, or fix its permissions",
    errno.EPERM: "choose a location you can read/write, or fix its permissions",
    errno.EROFS: "the file system is read-only; choose another location",
    errno.ENOSPC: "free some space (or choose another location) and run the same command "
                  "again",
    errno.EDQUOT: "free some space (or choose another location) and run the same command "
                  "again",
    errno.ENAMETOOLONG: "choose a shorter path",
}

#: where the traceback of an unexpected error goes when the command has an output directory
ERROR_LOG = "crosscoders-error.log"


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _output_dir(args: argparse.Namespace) -> Path | None:
    """The command's existing output directory, where an error log belongs, or None."""
    command = getattr(args, "command", None)
    if command == "report":
        out = Path(args.out).parent if args.out else Path(args.diff_dir)
    elif command in ("init", "bench"):
        return None  # they write single files, maybe into the working directory
    else:
        out = Path(args.out) if getattr(args, "out", None) else None
    return out if out is not None and out.is_dir() else None


def _write_traceback(args: argparse.Namespace, argv: Sequence[str] | None) -> str:
    """Write the current exception's traceback to a log file; return where it went."""
    command = shlex.join(["crosscoders", *(sys.argv[1:] if argv is None else argv)])
    text = (f"{datetime.datetime.now().isoformat(timespec='seconds')}  {command}\n\n"
            + traceback.format_exc())
    out = _output_dir(args)
    if out is not None:
        try:
            atomic_write_text(out / ERROR_LOG, text)
            return str(out / ERROR_LOG)
        except (OSError, CrosscodersError):
            pass  # e.g. a read-only output directory: fall back to a temp file
    for where in (None, os.getcwd()):
        try:
            fd, path = tempfile.mkstemp(prefix="crosscoders-error-", suffix=".log", dir=where)
            with os.fdopen(fd, "w") as handle:
                handle.write(text)
            return path
        except OSError:
            continue
    return "nowhere (no writable directory; set CROSSCODERS_TRACEBACK=1 to print it)"


def _named_os_error(err: OSError) -> str | None:
    """One line for an OSError on a path the user gave, or None if it is not one."""
    fix = _OS_FIXES.get(err.errno)
    if fix is None or err.filename is None:
        return None
    paths = str(err.filename) + (f" -> {err.filename2}" if err.filename2 else "")
    return f"{paths}: {err.strerror or brief(err)}; {fix}"


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. Problems the user can fix print ``error: ...`` (what is wrong and
    how to fix it) and exit 2; an unexpected exception prints one line saying where its
    full traceback was written and exits 1 (``CROSSCODERS_TRACEBACK=1`` re-raises it)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # --help, or a bad flag (its one line is already printed)
        return stop.code if isinstance(stop.code, int) else 0
    if getattr(args, "no_progress", False):
        _quiet_libraries()
    try:
        result = args.func(args)
        return result if isinstance(result, int) else 0
    except (CrosscodersError, TrainingDiverged) as err:
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    except Exception as err:
        if os.environ.get("CROSSCODERS_TRACEBACK"):
            raise
        named = _named_os_error(err) if isinstance(err, OSError) else None
        if named is not None:
            print(f"error: {_one_line(named)}", file=sys.stderr)
            return 2
        where = _write_traceback(args, argv)
        print(f"error: unexpected {_one_line(brief(err, limit=300))}; full traceback in "
              f"{where}", file=sys.stderr)
        return 1

