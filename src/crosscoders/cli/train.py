"""``crosscoders train --data DATA --out RUN``: train a crosscoder; the same command resumes.

Settings come from the dataclass defaults, then ``--config`` (its ``crosscoder`` and
``train`` sections), then the flags; the crosscoder's defaults (``dict_size`` from
``expansion``, source names from the store) are those of ``crosscoders run``.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from crosscoders.cli.flags import Field, Option, add_flags, merge, overrides
from crosscoders.cli.shared import NO_PROGRESS, SOURCE_NAMES
from crosscoders.errors import ConfigError
from crosscoders.io import check_dir_path
from crosscoders.model import CrosscoderConfig
from crosscoders.model.config import ACTIVATIONS
from crosscoders.pipeline.config import DEFAULT_EXPANSION, crosscoder_config
from crosscoders.train import TrainConfig

FLAGS = (
    Option("--data", required=True,
           help="a .safetensors/.pt/.npy file holding a float tensor [N, S, D], or an "
                "activation-store directory"),
    Option("--out", required=True, help="run directory (checkpoints, metrics, model)"),
    Option("--config", help="YAML/JSON file with 'crosscoder' and 'train' sections; flags "
                            "below override it"),
    Field(CrosscoderConfig, "activation", options={"choices": list(ACTIVATIONS)}),
    Field(CrosscoderConfig, "dict_size"),
    Option("--expansion", type=int,
           help=f"dict size as a multiple of d_model (default: {DEFAULT_EXPANSION})"),
    Field(CrosscoderConfig, "k"),
    Field(TrainConfig, "steps"),
    Field(TrainConfig, "batch_size"),
    Field(TrainConfig, "lr"),
    Field(TrainConfig, "l1_coeff"),
    Field(TrainConfig, "seed"),
    Field(TrainConfig, "device"),
    SOURCE_NAMES,
    Field(TrainConfig, "checkpoint_every"),
    Field(TrainConfig, "parallel", options={"choices": ["data", "none"]}),
    Field(TrainConfig, "loggers"),
    Field(TrainConfig, "wandb_project"),
    Field(TrainConfig, "wandb_entity"),
    Field(TrainConfig, "wandb_run_name"),
    Field(TrainConfig, "tensorboard_dir", aliases=("--tensorboard",)),
    NO_PROGRESS,
)

SECTIONS = ("crosscoder", "train")


def register(sub: Any) -> None:
    p = sub.add_parser("train", help="train a crosscoder on activations",
                       description="Train a crosscoder. Re-running the same command resumes.")
    add_flags(p, *FLAGS)
    p.set_defaults(func=run)


def _read_sections(path: str | None) -> dict[str, dict[str, Any]]:
    """The ``crosscoder`` and ``train`` sections of a config file (empty without one)."""
    from crosscoders.configs import read_config_file

    sections: dict[str, dict[str, Any]] = {key: {} for key in SECTIONS}
    if not path:
        return sections
    loaded = read_config_file(path)
    unknown = set(loaded) - set(sections)
    if unknown:
        raise ConfigError(
            f"{path}: unknown section {sorted(unknown, key=str)[0]!r}; put every setting "
            "under 'crosscoder:' or 'train:'"
        )
    for key in SECTIONS:
        section = loaded.get(key) or {}
        if not isinstance(section, dict):
            raise ConfigError(
                f"{path}: section {key!r} holds a {type(section).__name__}; write it as a "
                "mapping of keys to values"
            )
        sections[key].update(section)
    return sections


def run(args: argparse.Namespace) -> int:
    from crosscoders import train
    from crosscoders.data import as_source

    check_dir_path(args.out)
    sections = _read_sections(args.config)
    train_section = merge(sections["train"], overrides(args, TrainConfig, FLAGS))
    if args.no_progress:
        train_section["progress"] = False
    tc = TrainConfig.from_dict(train_section, _path="train")
    source = as_source(args.data, tc.eval_tokens, tc.batch_size)
    section = dict(sections["crosscoder"])
    if args.expansion is not None:  # the flag beats the file's dict_size
        section.pop("dict_size", None)
        section["expansion"] = args.expansion
    section.update(overrides(args, CrosscoderConfig, FLAGS))
    store_names = [s.get("name") for s in getattr(source, "sources", [])]
    # e.g. base/resid_out:12, chat/resid_out:12
    names = store_names if store_names and all(store_names) else None
    model = train(crosscoder_config(section, source.n_sources, source.d_model, names), source,
                  tc, run_dir=args.out)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 saved it
        print(f"saved crosscoder ({model.dict_size} latents) to {args.out}")
    return 0
