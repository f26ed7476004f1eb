"""``crosscoders layers RUN --out DIR``: layer profiles of a cross-layer crosscoder (see
``docs/layers.md``)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from crosscoders.cli.flags import Field, Option, add_flags, overrides
from crosscoders.io import check_dir_path
from crosscoders.pipeline.config import LayersSection

FLAGS = (
    Option("run_dir", help="crosscoder directory whose sources are layers of one model, in "
                           "depth order (or a Hub id)"),
    Option("--out", required=True, help="output directory"),
    Field(LayersSection, "threshold"),
    Option("--data", help="activations to count firing on (a store directory or a "
                          ".safetensors/.pt/.npy [N, S, D] file): the summary then counts only "
                          "latents that fire"),
    Field(LayersSection, "min_freq"),
    Field(LayersSection, "max_tokens"),
    Option("--no-plot", action="store_true", help="no figure (layers.png)"),
)


def register(sub: Any) -> None:
    p = sub.add_parser("layers", help="layer profiles of a cross-layer crosscoder (which "
                                      "layers each latent writes, how far it persists)")
    add_flags(p, *FLAGS)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from crosscoders.layers import firing_frequency, layer_profile
    from crosscoders.model import Crosscoder

    check_dir_path(args.out)
    section = LayersSection.from_dict(overrides(args, LayersSection, FLAGS))
    model = Crosscoder.load(args.run_dir)
    freq_F = None
    if args.data:
        from crosscoders.data import load_activation_file

        data = args.data if Path(args.data).is_dir() else load_activation_file(args.data)
        freq_F = firing_frequency(model, data, section.max_tokens)
    profile = layer_profile(model, section.threshold, freq_F, section.min_freq)
    profile.save(args.out, plot=not args.no_plot)
    s = profile.summary
    spans = ", ".join(f"{k}: {v}" for k, v in s["span_counts"].items())
    print(f"{s['n_counted']} of {s['n_latents']} latents counted ({s['counted']}) over "
          f"{s['n_sources']} layers; span counts {spans}")
    print(f"multi-layer {s['multi_layer_fraction']:.1%}, mean effective layers "
          f"{s['mean_effective_layers']:.2f}; wrote {args.out}")
    return 0
