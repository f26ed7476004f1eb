"""Command line: a thin layer over the library functions.

    crosscoders run CONFIG.yaml          the whole experiment (harvest, train, diff, report)
    crosscoders demo                     the built-in model-organism experiment
    crosscoders init [--example NAME]    write a commented starting config
    crosscoders harvest | train | diff | report    one stage at a time
    crosscoders bench synthetic | diffing          ground-truth benchmarks
    crosscoders import SRC --out DIR     a crosscoder saved by another codebase
    crosscoders export RUN --format F --out DIR    ... and the other way round
    crosscoders push RUN REPO_ID         upload to the Hugging Face Hub with a model card
    crosscoders layers RUN --out DIR     layer profiles of a cross-layer crosscoder
    crosscoders explain DIFF --latents chat_only   LLM explanations of latents, scored
"""

from __future__ import annotations

import argparse
import datetime
import errno
import os
import shlex
import sys
import tempfile
import traceback
from collections.abc import Sequence
from pathlib import Path

from crosscoders.errors import ConfigError, CrosscodersError, TrainingDiverged
from crosscoders.io import atomic_write_text, brief, check_dir_path, check_file_path


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a crosscoder on activations",
                       description="Train a crosscoder. Re-running the same command resumes.")
    p.add_argument("--data", required=True,
                   help="a .safetensors/.pt/.npy file holding a float tensor [N, S, D], or an "
                        "activation-store directory")
    p.add_argument("--out", required=True, help="run directory (checkpoints, metrics, model)")
    p.add_argument("--config", help="YAML/JSON file with 'crosscoder' and 'train' sections; "
                                    "flags below override it")
    p.add_argument("--activation", choices=["relu", "topk", "batchtopk", "jumprelu"])
    p.add_argument("--dict-size", type=int)
    p.add_argument("--expansion", type=int, help="dict size as a multiple of d_model")
    p.add_argument("--k", type=int)
    p.add_argument("--steps", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--l1-coeff", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--device")
    p.add_argument("--source-names", nargs="+", help="e.g. base chat")
    p.add_argument("--checkpoint-every", type=int)
    p.add_argument("--parallel", choices=["data", "none"],
                   help="under torchrun: data (the default there) trains one crosscoder on "
                        "every process's slice of each batch; see docs/scaling.md")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_run_train)


def _run_train(args) -> int:
    from crosscoders import CrosscoderConfig, TrainConfig, train
    from crosscoders.configs import read_config_file
    from crosscoders.data import as_source

    check_dir_path(args.out)
    sections = {"crosscoder": {}, "train": {}}
    if args.config:
        loaded = read_config_file(args.config)
        unknown = set(loaded) - set(sections)
        if unknown:
            raise ConfigError(
                f"{args.config}: unknown section {sorted(unknown, key=str)[0]!r}; put every "
                "setting under 'crosscoder:' or 'train:'"
            )
        for key in sections:
            section = loaded.get(key) or {}
            if not isinstance(section, dict):
                raise ConfigError(
                    f"{args.config}: section {key!r} holds a {type(section).__name__}; write "
                    "it as a mapping of keys to values"
                )
            sections[key].update(section)
    train_flags = {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
                   "l1_coeff": args.l1_coeff, "seed": args.seed, "device": args.device,
                   "checkpoint_every": args.checkpoint_every, "parallel": args.parallel}
    sections["train"].update({k: v for k, v in train_flags.items() if v is not None})
    if args.no_progress:
        sections["train"]["progress"] = False
    tc = TrainConfig.from_dict(sections["train"], _path="train")
    source = as_source(args.data, tc.eval_tokens, tc.batch_size)
    cc_dict = {"n_sources": source.n_sources, "d_model": source.d_model,
               **sections["crosscoder"]}
    if args.expansion:
        cc_dict["dict_size"] = args.expansion * source.d_model
    flags = {"dict_size": args.dict_size, "activation": args.activation, "k": args.k,
             "source_names": args.source_names}
    cc_dict.update({k: v for k, v in flags.items() if v is not None})
    cc_dict.setdefault("dict_size", 16 * source.d_model)
    store_names = [s.get("name") for s in getattr(source, "sources", [])]
    if "source_names" not in cc_dict and store_names and all(store_names):
        cc_dict["source_names"] = store_names  # e.g. base/resid_out:12, chat/resid_out:12
    model = train(CrosscoderConfig.from_dict(cc_dict, _path="crosscoder"), source, tc,
                  run_dir=args.out)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 saved it
        print(f"saved crosscoder ({model.dict_size} latents) to {args.out}")
    return 0


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="ground-truth benchmarks")
    bench = p.add_subparsers(dest="bench", required=True)
    s = bench.add_parser("synthetic", help="planted-feature recovery and diffing labels")
    s.add_argument("--activations", nargs="+", default=["relu", "batchtopk"])
    s.add_argument("--steps", type=int)
    s.add_argument("--seed", type=int, default=0, help="seed of the planted data")
    s.add_argument("--k", type=int)
    s.add_argument("--dict-size", type=int)
    s.add_argument("--l1-coeff", type=float)
    s.add_argument("--preset", choices=["anthropic", "kissane", "minder"], default="minder")
    s.add_argument("--threads", type=int, help="torch CPU threads (1 avoids oversubscription "
                                               "on small shared CPUs)")
    s.add_argument("--json", help="also write the results as JSON to this file")
    s.set_defaults(func=_run_bench_synthetic)
    from crosscoders.bench.diffing import add_bench_diffing_arguments, bench_diffing_from_args

    d = bench.add_parser("diffing", help="L1 vs BatchTopK, with and without Latent Scaling, "
                                         "on planted features that make L1 fail")
    add_bench_diffing_arguments(d)
    d.set_defaults(func=bench_diffing_from_args)
    lay = bench.add_parser("layers", help="cross-layer crosscoder vs one SAE per layer: "
                                          "total L0 at matched FVU on planted features")
    lay.add_argument("--layers", type=int, default=4)
    lay.add_argument("--d-model", type=int, default=32)
    lay.add_argument("--fire-prob", type=float, default=0.15)
    lay.add_argument("--noise", type=float, default=0.003)
    lay.add_argument("--steps", type=int, default=1000)
    lay.add_argument("--seed", type=int, default=0)
    lay.add_argument("--json", help="also write the results as JSON to this file")
    lay.set_defaults(func=_run_bench_layers)


def _run_bench_layers(args) -> int:
    import json

    from crosscoders.bench.layers import (
        compare_with_per_layer_saes,
        format_comparison,
        planted_layer_data,
    )

    if args.json:
        check_file_path(args.json, "--json")
    for flag, value in (("--layers", args.layers), ("--d-model", args.d_model),
                        ("--steps", args.steps)):
        if value < 1:
            raise CrosscodersError(f"{flag} must be >= 1, got {value}")
    acts, _, spans = planted_layer_data(n_layers=args.layers, d_model=args.d_model,
                                        fire_prob=args.fire_prob, noise=args.noise,
                                        seed=args.seed)
    print(f"{len(spans)} planted features, mean span {spans.mean():.2f} layers")
    result = compare_with_per_layer_saes(acts, steps=args.steps, seed=args.seed)
    print(format_comparison(result))
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=2) + "\n")
    return 0


def _run_bench_synthetic(args) -> int:
    import json

    from crosscoders.bench.planted import PlantedConfig
    from crosscoders.bench.synthetic import (
        format_benchmark_table,
        run_planted_benchmark,
    )

    if args.json:
        check_file_path(args.json, "--json")
    kwargs = {"activations": tuple(args.activations), "preset": args.preset,
              "num_threads": args.threads}
    for name in ("steps", "k", "dict_size", "l1_coeff"):
        if getattr(args, name) is not None:
            kwargs[name] = getattr(args, name)
    result = run_planted_benchmark(PlantedConfig(seed=args.seed), **kwargs)
    print(format_benchmark_table(result))
    if args.json:
        data = result if isinstance(result, dict) else getattr(result, "to_dict", lambda: {})()
        atomic_write_text(args.json, json.dumps(data, indent=2, default=str) + "\n")
    return 0


def _add_run(sub) -> None:
    p = sub.add_parser("run", help="run a whole experiment from one YAML config",
                       description="Run every stage; unchanged stages are not redone and an "
                                   "interrupted run continues where it stopped.")
    p.add_argument("config", help="pipeline YAML (see `crosscoders init`)")
    p.add_argument("--out", help="override the config's output directory")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_run_pipeline)


def _run_pipeline(args) -> int:
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


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="the built-in model-organism experiment, end to end")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_run_demo)


def _run_demo(args) -> int:
    from crosscoders.pipeline import run_pipeline
    from crosscoders.pipeline.examples import load_example
    from crosscoders.pipeline.summary import format_summary

    check_dir_path(args.out)
    config = load_example("demo").replace(out=args.out)
    result = run_pipeline(config, progress=not args.no_progress)
    print(format_summary(result, result.token_strings()))
    return 0


def _add_init(sub) -> None:
    from crosscoders.pipeline.examples import EXAMPLES

    p = sub.add_parser("init", help="write a commented starting config")
    p.add_argument("--example", choices=sorted(EXAMPLES), default="smollm2")
    p.add_argument("--out", default="crosscoders.yaml")
    p.add_argument("--force", action="store_true", help="overwrite an existing file")
    p.set_defaults(func=_run_init)


def _run_init(args) -> int:
    from crosscoders.pipeline.examples import example_text

    out = check_file_path(args.out)
    if out.exists() and not args.force:
        raise CrosscodersError(f"{out} exists; pass --force to overwrite it or choose --out")
    atomic_write_text(out, example_text(args.example))
    print(f"wrote {out}; edit it, then: crosscoders run {out}")
    return 0


def _add_stage_commands(sub) -> None:
    """harvest, diff and report: each module brings its own arguments."""
    from crosscoders.diff.cli import add_diff_arguments, diff_from_args
    from crosscoders.harvest.cli import add_harvest_arguments
    from crosscoders.interp.cli import add_explain_arguments, explain_from_args
    from crosscoders.layers import add_layers_arguments, layers_from_args
    from crosscoders.report import add_report_arguments, report_from_args

    for name, help_text, add_arguments, run in (
        ("harvest", "harvest activations from models into a store", add_harvest_arguments,
         _run_harvest),
        ("diff", "per-latent diffing analysis of a trained crosscoder", add_diff_arguments,
         diff_from_args),
        ("report", "the browsable HTML report", add_report_arguments, report_from_args),
        ("layers", "layer profiles of a cross-layer crosscoder (which layers each latent "
         "writes, how far it persists)", add_layers_arguments, layers_from_args),
        ("explain", "LLM explanations of latents, scored by detection", add_explain_arguments,
         explain_from_args),
    ):
        parser = sub.add_parser(name, help=help_text)
        add_arguments(parser)
        parser.set_defaults(func=run)


def _run_harvest(args) -> int:
    from crosscoders.harvest.cli import harvest_from_args

    harvest_from_args(args)  # returns the store, for Python callers
    return 0


def _add_import(sub) -> None:
    p = sub.add_parser(
        "import", help="convert a crosscoder saved by another codebase",
        description="Convert a dictionary_learning, Kissane or crosscode crosscoder into a "
                    "crosscoders directory (config.json + model.safetensors) that `diff` and "
                    "`report` read. See docs/formats.md.")
    p.add_argument("source", help="checkpoint file or directory, or a Hugging Face Hub id "
                                  "(owner/name or owner/name/subfolder)")
    p.add_argument("--out", required=True, help="directory to write")
    p.add_argument("--format", default="auto",
                   choices=["auto", "dictionary_learning", "kissane", "crosscode"])
    p.add_argument("--scale", type=float, nargs="+",
                   help="kissane: the per-model normalisation factors to fold in")
    p.add_argument("--scale-from",
                   help="kissane: estimate those factors from raw activations [N, S, D] "
                        "(.safetensors/.pt/.npy)")
    p.add_argument("--source-names", nargs="+", help="e.g. base chat")
    p.set_defaults(func=_run_import)


def _run_import(args) -> int:
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


def _add_format_commands(sub) -> None:
    from crosscoders.formats.cli import (
        add_export_arguments,
        add_push_arguments,
        export_from_args,
        push_from_args,
    )

    push = sub.add_parser("push", help="upload a crosscoder (and its diff) to the Hugging Face "
                                       "Hub with a model card")
    add_push_arguments(push)
    push.set_defaults(func=push_from_args)
    export = sub.add_parser("export", help="write a crosscoder in another codebase's format "
                                           "(dictionary_learning, crosscode)")
    add_export_arguments(export)
    export.set_defaults(func=export_from_args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="crosscoders", description="Train crosscoders and use them to diff models."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_run(sub)
    _add_demo(sub)
    _add_init(sub)
    _add_train(sub)
    _add_bench(sub)
    _add_stage_commands(sub)
    _add_import(sub)
    _add_format_commands(sub)
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
    args = parser.parse_args(argv)
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


if __name__ == "__main__":
    sys.exit(main())
