"""``crosscoders diff RUN_DIR [--store STORE] [--models ...] --out DIFF_DIR``: the per-latent
diffing analysis of a trained crosscoder (see ``docs/diffing.md``)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from crosscoders.cli.flags import Field, Option, add_flags, apply, overrides
from crosscoders.cli.shared import NO_PROGRESS, PRESET_CHOICES
from crosscoders.diff.run import DiffConfig
from crosscoders.diff.schema import TABLE_FILES, Summary
from crosscoders.errors import ConfigError
from crosscoders.io import check_dir_path, read_json
from crosscoders.model.crosscoder import CONFIG_FILE

FLAGS = (
    Option("run_dir", help="crosscoder directory (config.json + model.safetensors)"),
    Option("--store", help="activation store directory (default: the store the crosscoder "
                           "was trained on, if recorded)"),
    Option("--weights-only", action="store_true",
           help="no data: only the columns that come from the weights (decoder norms, "
                "relative norms, categories, cosines), e.g. for an imported crosscoder "
                "without activations"),
    Option("--out", required=True, help="output directory"),
    Option("--models", nargs="+", metavar="[NAME=]PATH",
           help="models for causal checks and the lens: NAME=PATH per store model, or 'auto' "
                "to use the paths recorded in the store"),
    Option("--config", help="YAML/JSON DiffConfig; flags below override it"),
    Field(DiffConfig, "base"),
    Field(DiffConfig, "chat"),
    Field(DiffConfig, "preset", options={"choices": PRESET_CHOICES}),
    Field(DiffConfig, "latent_scaling", options={"choices": ["auto", "all", "none"]}),
    Field(DiffConfig, "rule.nu_r_max"),
    Field(DiffConfig, "rule.nu_eps_max"),
    Field(DiffConfig, "examples", options={"choices": ["exclusive", "all", "none"]}),
    Field(DiffConfig, "n_top"),
    Field(DiffConfig, "max_tokens"),
    Field(DiffConfig, "batch_size"),
    Field(DiffConfig, "steer_prompts", flag="--steer-prompt",
          options={"action": "append", "dest": "steer_prompts"}),
    Field(DiffConfig, "device"),
    NO_PROGRESS,
)


def register(sub: Any) -> None:
    p = sub.add_parser("diff", help="per-latent diffing analysis of a trained crosscoder")
    add_flags(p, *FLAGS)
    p.set_defaults(func=run)


def parse_models(values: list[str] | None, manifest: dict[str, Any]) -> dict[str, str] | None:
    """``--models`` as {store model name: path}: ``NAME=PATH`` items, bare paths in the
    store's model order, or ``auto`` for the paths the store recorded."""
    if not values:
        return None
    names = list(dict.fromkeys(s.get("model") for s in manifest.get("sources", [])))
    if values == ["auto"]:
        paths = {s["model"]: s["path"] for s in manifest.get("sources", []) if "path" in s}
        if not paths:
            raise ConfigError("--models auto: the store records no model paths; give NAME=PATH")
        return paths
    out = {}
    for i, value in enumerate(values):
        name, sep, path = value.partition("=")
        if not sep:
            if i >= len(names):
                raise ConfigError(f"--models {value}: the store has models {names}; use NAME=PATH")
            name, path = names[i], value
        out[name] = path
    return out


def default_store(run_dir: str) -> str:
    """The activation store ``run_dir``'s crosscoder was trained on, if it records one that
    exists here."""
    config = Path(run_dir) / CONFIG_FILE
    if config.is_file():
        meta = read_json(config, "the crosscoder directory is damaged: save it again, or "
                                 "pass --store STORE_DIR")
        data = meta.get("metadata", {}).get("data", {}) if isinstance(meta, dict) else {}
        if data.get("kind") == "activation_store" and Path(data.get("path", "")).is_dir():
            return data["path"]
    if not Path(run_dir).exists():
        raise ConfigError(
            f"no crosscoder directory at {run_dir}; check the path (a directory written by "
            "`crosscoders train`), or pass --store STORE_DIR for a Hub id"
        )
    raise ConfigError(
        f"no --store given and {run_dir} does not record a store it was trained on; pass "
        "--store STORE_DIR"
    )


def _weights_only(run_dir: str, out: str, cfg: DiffConfig) -> int:
    from crosscoders.diff.table import latent_table
    from crosscoders.model import Crosscoder

    model = Crosscoder.load(run_dir)
    base = 0 if cfg.base is None else cfg.base
    chat = 1 if cfg.chat is None else cfg.chat
    table = latent_table(model, None, base=base, chat=chat, preset=cfg.thresholds or cfg.preset)
    table.summary[Summary.WEIGHTS_ONLY] = True
    table.save(out)
    counts = ", ".join(f"{k} {v}" for k, v in table.summary[Summary.COUNTS].items())
    print(f"latents (from the weights only): {counts}")
    print(f"wrote {out}/{', '.join(TABLE_FILES)}")
    return 0


def run(args: argparse.Namespace) -> int:
    from crosscoders.diff.run import run_diff
    from crosscoders.store import ActivationStore

    check_dir_path(args.out)
    cfg = DiffConfig.load(args.config) if args.config else DiffConfig()
    changes = overrides(args, DiffConfig, FLAGS)
    if args.no_progress:
        changes["progress"] = False
    cfg = apply(cfg, changes)
    if args.weights_only:
        return _weights_only(args.run_dir, args.out, cfg)
    store = ActivationStore.open(args.store or default_store(args.run_dir))
    models = parse_models(args.models, store.manifest)
    summary = run_diff(args.run_dir, store, args.out, cfg, models)
    counts = ", ".join(f"{k} {v}" for k, v in summary[Summary.COUNTS].items())
    fvu = ", ".join(f"{k} {v:.3f}" for k, v in summary[Summary.FVU].items())
    print(f"latents: {counts}; FVU {fvu}; L0 {summary[Summary.L0]:.1f}; "
          f"dead {summary[Summary.DEAD_FRACTION]:.1%}")
    ls = summary.get(Summary.LATENT_SCALING)
    if ls:
        print(f"truly chat-only: {ls['n_truly_chat_only']} of {ls['n_chat_only_scaled']} "
              f"chat-only latents (nu_r < {ls['rule']['nu_r_max']}, "
              f"nu_eps < {ls['rule']['nu_eps_max']})")
    print(f"wrote {args.out}")
    return 0
