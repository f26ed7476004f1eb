"""``crosscoders bench synthetic | diffing | layers``: the ground-truth benchmarks."""

from __future__ import annotations

import argparse
from typing import Any

from crosscoders.bench.diffing import DiffingBenchConfig
from crosscoders.bench.planted import PlantedConfig
from crosscoders.cli.flags import Field, Option, add_flags, apply, overrides
from crosscoders.cli.shared import JSON, PRESET_CHOICES
from crosscoders.errors import CrosscodersError
from crosscoders.io import check_file_path, write_json

SYNTHETIC_FLAGS = (
    Option("--activations", nargs="+", default=["relu", "batchtopk"],
           help="crosscoders to train (default: relu batchtopk)"),
    Option("--steps", type=int, help="training steps per crosscoder"),
    Field(PlantedConfig, "seed"),
    Option("--k", type=int, help="k of topk and batchtopk"),
    Option("--dict-size", type=int, help="latents per crosscoder"),
    Option("--l1-coeff", type=float, help="sparsity coefficient of relu"),
    Option("--preset", choices=PRESET_CHOICES, default="minder",
           help="category thresholds (default: minder)"),
    Option("--threads", type=int, help="torch CPU threads (1 avoids oversubscription on small "
                                       "shared CPUs)"),
    JSON,
)

DIFFING_FLAGS = (
    Field(DiffingBenchConfig, "activations",
          options={"choices": ["relu", "topk", "batchtopk"]}),
    Field(DiffingBenchConfig, "steps"),
    Field(DiffingBenchConfig, "n_shared_latents", flag="--shared-latents"),
    Field(DiffingBenchConfig, "seed"),
    Field(DiffingBenchConfig, "planted.n_shared_shifted", flag="--shifted"),
    Field(DiffingBenchConfig, "preset", options={"choices": PRESET_CHOICES}),
    Option("--config", help="YAML/JSON DiffingBenchConfig (flags override it)"),
    JSON,
    Option("--progress", action="store_true", help="show progress bars"),
)

LAYERS_FLAGS = (
    Option("--layers", type=int, default=4, help="layers of the planted model (default: 4)"),
    Option("--d-model", type=int, default=32, help="width of each layer (default: 32)"),
    Option("--fire-prob", type=float, default=0.15,
           help="probability that a feature fires on a token (default: 0.15)"),
    Option("--noise", type=float, default=0.003, help="noise std (default: 0.003)"),
    Option("--steps", type=int, default=1000, help="training steps (default: 1000)"),
    Option("--seed", type=int, default=0, help="data and training seed (default: 0)"),
    JSON,
)


def register(sub: Any) -> None:
    p = sub.add_parser("bench", help="ground-truth benchmarks")
    bench = p.add_subparsers(dest="bench", required=True)
    for name, help_text, flags, run in (
        ("synthetic", "planted-feature recovery and diffing labels", SYNTHETIC_FLAGS,
         run_synthetic),
        ("diffing", "L1 vs BatchTopK, with and without Latent Scaling, on planted features "
         "that make L1 fail", DIFFING_FLAGS, run_diffing),
        ("layers", "cross-layer crosscoder vs one SAE per layer: total L0 at matched FVU on "
         "planted features", LAYERS_FLAGS, run_layers),
    ):
        parser = bench.add_parser(name, help=help_text)
        add_flags(parser, *flags)
        parser.set_defaults(func=run)


def run_synthetic(args: argparse.Namespace) -> int:
    from crosscoders.bench.synthetic import format_benchmark_table, run_planted_benchmark

    if args.json:
        check_file_path(args.json, "--json")  # before minutes of training, not after
    kwargs = {"activations": tuple(args.activations), "preset": args.preset,
              "num_threads": args.threads}
    for name in ("steps", "k", "dict_size", "l1_coeff"):
        if getattr(args, name) is not None:
            kwargs[name] = getattr(args, name)
    planted = PlantedConfig.from_dict(overrides(args, PlantedConfig, SYNTHETIC_FLAGS))
    result = run_planted_benchmark(planted, **kwargs)
    print(format_benchmark_table(result))
    if args.json:
        data = result if isinstance(result, dict) else getattr(result, "to_dict", lambda: {})()
        write_json(args.json, data, default=str)
    return 0


def run_diffing(args: argparse.Namespace) -> int:
    from crosscoders.bench.diffing import format_diffing_table, run_diffing_benchmark

    if args.json:
        check_file_path(args.json, "--json")  # before minutes of training, not after
    cfg = DiffingBenchConfig.load(args.config) if args.config else DiffingBenchConfig()
    changes = overrides(args, DiffingBenchConfig, DIFFING_FLAGS)
    if args.seed is not None:  # one seed for the data and the training
        changes.setdefault("planted", {})["seed"] = args.seed
    cfg = apply(cfg, changes)
    result = run_diffing_benchmark(cfg, progress=args.progress)
    print(format_diffing_table(result))
    if args.json:
        write_json(args.json, result, default=float)
    return 0


def run_layers(args: argparse.Namespace) -> int:
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
        write_json(args.json, result)
    return 0
