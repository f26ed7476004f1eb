"""``crosscoders harvest --base B --chat C --data TEXT --out STORE``: activations from
models into a store (see ``docs/harvest.md``); the same command resumes."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from crosscoders.cli.flags import Field, Option, add_flags, merge, overrides
from crosscoders.cli.shared import NO_PROGRESS
from crosscoders.errors import ConfigError
from crosscoders.harvest.config import DataSpec, HarvestConfig, ModelSpec
from crosscoders.io import check_dir_path


def _number(text: str) -> int | float:
    value = float(text)
    return int(value) if value.is_integer() and value >= 1 else value


MODEL_FLAGS = (
    Option("--base", help="base model: hub id, local directory or .gguf file"),
    Option("--chat", help="chat (fine-tuned) model, same forms as --base"),
    Option("--model", action="append", default=[], metavar="[NAME=]PATH",
           help="any model (repeat for several); general form of --base/--chat"),
    Field(ModelSpec, "sites", flag="--layers", aliases=("--sites",),
          options={"dest": "sites", "metavar": "SITE"}),
    Field(ModelSpec, "revision"),
    Option("--config", type=Path, help="a HarvestConfig YAML/JSON file; other flags override "
                                       "its fields"),
)
TEXT_FLAGS = (
    Option("--data", nargs="+", metavar="PATH",
           help=".txt/.jsonl/.parquet files, saved datasets or HF dataset names"),
    Option("--weights", nargs="+", type=float,
           help="mixture proportions, one per --data (default equal)"),
    Field(DataSpec, "text_field"),
    Field(DataSpec, "messages_field"),
    Field(DataSpec, "split"),
    Field(DataSpec, "format"),
)
TOKEN_FLAGS = (
    Field(HarvestConfig, "tokens"),
    Field(HarvestConfig, "context_length"),
    Field(HarvestConfig, "packing"),
    Field(HarvestConfig, "bos"),
    Field(HarvestConfig, "skip_first"),
    Field(HarvestConfig, "exclude_tokens", options={"nargs": "*", "metavar": "TOKEN"}),
    Field(HarvestConfig, "exclude_special", flag="--keep-special", invert=True),
    Field(HarvestConfig, "chat_template_from"),
)
RUN_FLAGS = (
    Option("--out", type=Path, required=True, help="store directory (resumes if it exists)"),
    Field(HarvestConfig, "batch_size"),
    Field(HarvestConfig, "dtype"),
    Field(HarvestConfig, "device"),
    Field(HarvestConfig, "store_dtype"),
    Field(HarvestConfig, "shard_tokens"),
    Field(HarvestConfig, "eval_tokens", options={"type": _number}),
    Field(HarvestConfig, "sequential"),
    NO_PROGRESS,
)
FLAGS = MODEL_FLAGS + TEXT_FLAGS + TOKEN_FLAGS + RUN_FLAGS


def register(sub: Any) -> None:
    p = sub.add_parser("harvest", help="harvest activations from models into a store")
    for title, flags in (("models and sites", MODEL_FLAGS), ("text", TEXT_FLAGS),
                         ("tokens", TOKEN_FLAGS), ("run and store", RUN_FLAGS)):
        add_flags(p.add_argument_group(title), *flags)
    p.set_defaults(func=run)


def harvest_config(args: argparse.Namespace) -> HarvestConfig:
    """The (validated) HarvestConfig the flags describe: ``--config``, then the flags."""
    base: dict[str, Any] = HarvestConfig.load(args.config).to_dict() if args.config else {}
    model_flags = overrides(args, ModelSpec, FLAGS)
    models = []
    pairs = [("base", args.base), ("chat", args.chat)]
    pairs += [tuple(m.split("=", 1)) if "=" in m else ("", m) for m in args.model]
    for name, path in pairs:
        if path:
            models.append({"path": path, "name": name, **model_flags})
    if models:
        base["models"] = models
    elif args.sites and base.get("models"):
        for spec in base["models"]:
            spec["sites"] = list(args.sites)
    if not base.get("models"):
        raise ConfigError("no models: give --base and --chat, --model (repeatable), or --config")
    if args.data:
        weights = args.weights or [1.0] * len(args.data)
        if len(weights) != len(args.data):
            raise ConfigError(
                f"--weights has {len(weights)} values for {len(args.data)} --data paths; give "
                "one weight per --data path, in the same order (or none, for equal weights)"
            )
        data_flags = overrides(args, DataSpec, FLAGS)
        base["data"] = [{"path": p, "weight": w, **data_flags}
                        for p, w in zip(args.data, weights, strict=True)]
    if not base.get("data"):
        raise ConfigError("no data: give --data PATH [PATH ...] or --config")
    return HarvestConfig.from_dict(merge(base, overrides(args, HarvestConfig, FLAGS)))


def run(args: argparse.Namespace) -> int:
    from crosscoders.harvest.loop import harvest

    check_dir_path(args.out)
    store = harvest(harvest_config(args), args.out, progress=not args.no_progress)
    masked = ", ".join(f"{k} {v}" for k, v in store.manifest.get("masked", {}).items())
    print(
        f"{store.root}: {store.n_tokens} tokens x {store.n_sources} sources x d_model "
        f"{store.d_model} ({store.dtype}); held out {store.n_eval}; not stored: {masked}"
    )
    return 0
