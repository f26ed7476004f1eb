"""``crosscoders harvest``: argument parsing over :func:`crosscoders.harvest.harvest`."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from crosscoders.errors import ConfigError
from crosscoders.harvest.config import DataSpec, HarvestConfig, ModelSpec
from crosscoders.harvest.loop import harvest
from crosscoders.io import check_dir_path
from crosscoders.store.reader import ActivationStore

# Flags that map one-to-one onto HarvestConfig fields (flag dest == field name).
_SCALARS = (
    "tokens",
    "context_length",
    "packing",
    "bos",
    "skip_first",
    "batch_size",
    "dtype",
    "device",
    "store_dtype",
    "shard_tokens",
    "eval_tokens",
    "chat_template_from",
)


def _number(text: str) -> int | float:
    value = float(text)
    return int(value) if value.is_integer() and value >= 1 else value


def add_harvest_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``harvest`` options to ``parser`` (see ``docs/harvest.md``)."""
    src = parser.add_argument_group("models and sites")
    src.add_argument("--base", help="base model: hub id, local directory or .gguf file")
    src.add_argument("--chat", help="chat (fine-tuned) model, same forms as --base")
    src.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="[NAME=]PATH",
        help="any model (repeat for several); general form of --base/--chat",
    )
    src.add_argument(
        "--layers",
        "--sites",
        dest="sites",
        nargs="+",
        default=None,
        metavar="SITE",
        help="sites read from every model: 12, -1, 0.5 (fraction of depth), "
        "resid_in:3, resid_out:0.5 (default 0.5)",
    )
    src.add_argument("--revision", default=None, help="hub revision for every model")
    src.add_argument(
        "--config",
        type=Path,
        default=None,
        help="a HarvestConfig YAML/JSON file; other flags override its fields",
    )
    data = parser.add_argument_group("text")
    data.add_argument(
        "--data",
        nargs="+",
        default=None,
        metavar="PATH",
        help=".txt/.jsonl/.parquet files, saved datasets or HF dataset names",
    )
    data.add_argument(
        "--weights",
        nargs="+",
        type=float,
        default=None,
        help="mixture proportions, one per --data (default equal)",
    )
    data.add_argument("--text-field", default="text")
    data.add_argument("--messages-field", default="messages")
    data.add_argument("--split", default="train")
    data.add_argument("--format", choices=["auto", "text", "chat"], default="auto")
    tok = parser.add_argument_group("tokens")
    tok.add_argument("--tokens", type=int, help="tokens to store (default 1,000,000)")
    tok.add_argument("--context-length", type=int)
    tok.add_argument("--packing", choices=["pack", "doc"])
    tok.add_argument("--bos", choices=["auto", "context", "document", "none"])
    tok.add_argument("--skip-first", type=int, help="skip the first n positions of each context")
    tok.add_argument(
        "--exclude-tokens",
        nargs="*",
        default=None,
        metavar="TOKEN",
        help="extra tokens never stored (template tokens, ...)",
    )
    tok.add_argument(
        "--keep-special",
        action="store_true",
        help="store special tokens other than BOS/padding (default: excluded)",
    )
    tok.add_argument(
        "--chat-template-from",
        type=int,
        help="index of the model whose chat template formats chat data",
    )
    run = parser.add_argument_group("run and store")
    run.add_argument(
        "--out", type=Path, required=True, help="store directory (resumes if it exists)"
    )
    run.add_argument("--batch-size", type=int, help="contexts per forward pass")
    run.add_argument(
        "--dtype", choices=["float32", "bfloat16", "float16"], help="model weights dtype"
    )
    run.add_argument("--device", help="cpu, cuda, cuda:1 or auto")
    run.add_argument("--store-dtype", choices=["float32", "bfloat16", "float16"])
    run.add_argument("--shard-tokens", type=int)
    run.add_argument("--eval-tokens", type=_number, help="held-out tokens: count or fraction (<1)")
    run.add_argument(
        "--sequential",
        action="store_true",
        help="run the models one after the other (one in memory at a time)",
    )
    run.add_argument("--no-progress", action="store_true")


def config_from_args(args: argparse.Namespace) -> HarvestConfig:
    """Build (and validate) the HarvestConfig the arguments describe."""
    base: dict[str, Any] = HarvestConfig.load(args.config).to_dict() if args.config else {}
    models = []
    pairs = [("base", args.base), ("chat", args.chat)]
    pairs += [tuple(m.split("=", 1)) if "=" in m else ("", m) for m in args.model]
    for name, path in pairs:
        if path:
            spec: dict[str, Any] = {"path": path, "name": name}
            if args.sites:
                spec["sites"] = list(args.sites)
            if args.revision:
                spec["revision"] = args.revision
            models.append(spec)
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
        base["data"] = [
            {
                "path": p,
                "weight": w,
                "text_field": args.text_field,
                "format": args.format,
                "messages_field": args.messages_field,
                "split": args.split,
            }
            for p, w in zip(args.data, weights, strict=True)
        ]
    if not base.get("data"):
        raise ConfigError("no data: give --data PATH [PATH ...] or --config")
    for name in _SCALARS:
        value = getattr(args, name, None)
        if value is not None:
            base[name] = value
    if args.exclude_tokens is not None:
        base["exclude_tokens"] = list(args.exclude_tokens)
    if args.keep_special:
        base["exclude_special"] = False
    if args.sequential:
        base["sequential"] = True
    base["models"] = [
        m if isinstance(m, ModelSpec) else ModelSpec.from_dict(m) for m in base["models"]
    ]
    base["data"] = [d if isinstance(d, DataSpec) else DataSpec.from_dict(d) for d in base["data"]]
    return HarvestConfig.from_dict(base)


def harvest_from_args(args: argparse.Namespace) -> ActivationStore:
    """Run the harvest the parsed arguments describe and print a one-line summary."""
    check_dir_path(args.out)
    config = config_from_args(args)
    store = harvest(config, args.out, progress=not args.no_progress)
    masked = ", ".join(f"{k} {v}" for k, v in store.manifest.get("masked", {}).items())
    print(
        f"{store.root}: {store.n_tokens} tokens x {store.n_sources} sources x d_model "
        f"{store.d_model} ({store.dtype}); held out {store.n_eval}; not stored: {masked}"
    )
    return store
