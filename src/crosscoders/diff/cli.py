"""``crosscoders diff RUN_DIR --store STORE [--models ...] --out DIFF_DIR``: flags over
:func:`crosscoders.diff.run.run_diff`."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from crosscoders.errors import ConfigError
from crosscoders.io import check_dir_path, read_json


def add_diff_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``diff`` options to ``parser`` (see ``docs/diffing.md``)."""
    parser.add_argument("run_dir", help="crosscoder directory (config.json + model.safetensors)")
    parser.add_argument("--store", help="activation store directory (default: the store the "
                        "crosscoder was trained on, if recorded)")
    parser.add_argument("--weights-only", action="store_true",
                        help="no data: only the columns that come from the weights (decoder "
                             "norms, relative norms, categories, cosines), e.g. for an "
                             "imported crosscoder without activations")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--models", nargs="+", metavar="[NAME=]PATH",
                        help="models for causal checks and the lens: NAME=PATH per store model, "
                             "or 'auto' to use the paths recorded in the store")
    parser.add_argument("--config", help="YAML/JSON DiffConfig; flags below override it")
    parser.add_argument("--base", help="base source (crosscoder source name/index, store "
                                       "source name or model name)")
    parser.add_argument("--chat", help="chat source, same forms as --base")
    parser.add_argument("--preset", choices=["anthropic", "kissane", "minder"])
    parser.add_argument("--latent-scaling", choices=["auto", "all", "none"])
    parser.add_argument("--nu-r-max", type=float, help="truly chat-only if nu_r below (0.5)")
    parser.add_argument("--nu-eps-max", type=float, help="and nu_eps below (0.2)")
    parser.add_argument("--examples", choices=["exclusive", "all", "none"])
    parser.add_argument("--n-top", type=int)
    parser.add_argument("--max-tokens", type=int, help="analyse only the first N rows")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--steer-prompt", action="append", dest="steer_prompts",
                        help="steer the top chat-only latents on this prompt (repeatable)")
    parser.add_argument("--device")
    parser.add_argument("--no-progress", action="store_true")
    parser.set_defaults(func=diff_from_args)


def _parse_models(values: list[str] | None, manifest: dict[str, Any]) -> dict[str, str] | None:
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


def _default_store(run_dir: str) -> str:
    config = Path(run_dir) / "config.json"
    if config.is_file():
        meta = read_json(config, "the crosscoder directory is damaged: save it again, or "
                                 "pass --store STORE_DIR")
        data = meta.get("metadata", {}).get("data", {}) if isinstance(meta, dict) else {}
        if data.get("kind") == "activation_store" and Path(data.get("path", "")).is_dir():
            return data["path"]
    raise ConfigError(
        f"no --store given and {run_dir} does not record a store it was trained on; pass "
        "--store STORE_DIR"
    )


def _weights_only(run_dir: str, out: str, cfg: Any) -> int:
    from crosscoders.diff.table import latent_table
    from crosscoders.model import Crosscoder

    model = Crosscoder.load(run_dir)
    base = 0 if cfg.base is None else cfg.base
    chat = 1 if cfg.chat is None else cfg.chat
    table = latent_table(model, None, base=base, chat=chat, preset=cfg.thresholds or cfg.preset)
    table.summary["weights_only"] = True
    table.save(out)
    counts = ", ".join(f"{k} {v}" for k, v in table.summary["counts"].items())
    print(f"latents (from the weights only): {counts}")
    print(f"wrote {out}/latents.parquet, latents.csv, summary.json")
    return 0


def diff_from_args(args: argparse.Namespace) -> int:
    """Run ``crosscoders diff`` from parsed flags; prints where the results went."""
    from crosscoders.diff.run import DiffConfig, run_diff
    from crosscoders.store import ActivationStore

    check_dir_path(args.out)
    cfg = DiffConfig.load(args.config) if args.config else DiffConfig()
    flags = {"base": args.base, "chat": args.chat, "preset": args.preset,
             "latent_scaling": args.latent_scaling, "examples": args.examples,
             "n_top": args.n_top, "max_tokens": args.max_tokens, "batch_size": args.batch_size,
             "steer_prompts": args.steer_prompts, "device": args.device}
    changes: dict[str, Any] = {k: v for k, v in flags.items() if v is not None}
    if args.nu_r_max is not None or args.nu_eps_max is not None:
        rule = cfg.rule
        changes["rule"] = rule.replace(
            nu_r_max=args.nu_r_max if args.nu_r_max is not None else rule.nu_r_max,
            nu_eps_max=args.nu_eps_max if args.nu_eps_max is not None else rule.nu_eps_max)
    if args.no_progress:
        changes["progress"] = False
    cfg = cfg.replace(**changes)
    if args.weights_only:
        return _weights_only(args.run_dir, args.out, cfg)
    store = ActivationStore.open(args.store or _default_store(args.run_dir))
    models = _parse_models(args.models, store.manifest)
    summary = run_diff(args.run_dir, store, args.out, cfg, models)
    counts = ", ".join(f"{k} {v}" for k, v in summary["counts"].items())
    fvu = ", ".join(f"{k} {v:.3f}" for k, v in summary["fvu"].items())
    print(f"latents: {counts}; FVU {fvu}; L0 {summary['l0']:.1f}; "
          f"dead {summary['dead_fraction']:.1%}")
    ls = summary.get("latent_scaling")
    if ls:
        print(f"truly chat-only: {ls['n_truly_chat_only']} of {ls['n_chat_only_scaled']} "
              f"chat-only latents (nu_r < {ls['rule']['nu_r_max']}, "
              f"nu_eps < {ls['rule']['nu_eps_max']})")
    print(f"wrote {args.out}")
    return 0
