"""Extended planted benchmark: the decoupled features, the Latent Scaling relabelling, the
table, and (slow) the published result on the full benchmark."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from crosscoders.bench.diffing import (
    DECOUPLED,
    DiffingBenchConfig,
    format_diffing_table,
    make_diffing_data,
    run_diffing_benchmark,
    with_latent_scaling,
)
from crosscoders.bench.planted import PlantedConfig
from crosscoders.cli import bench as bench_cli
from crosscoders.cli import build_parser
from crosscoders.errors import ConfigError


def _small(**changes) -> DiffingBenchConfig:
    planted = PlantedConfig(d_model=16, n_shared=6, n_shared_rotated=0, n_shared_weaker=4,
                            n_base_only=3, n_chat_only=3, n_tokens=4096, fire_prob=0.05)
    return DiffingBenchConfig(planted=planted, n_decoupled=4, dict_size=48, steps=60,
                              batch_size=256, **changes)


def test_decoupled_features_fire_together_with_independent_magnitudes():
    cfg = _small()
    data = make_diffing_data(cfg)
    P = len(data.kinds)
    assert data.kinds.count(DECOUPLED) == 4 and data.directions_PSD.shape == (P, 2, 16)
    dirs = data.directions_PSD[-4:].double()
    cos = torch.nn.functional.cosine_similarity(dirs[:, 0], dirs[:, 1], dim=-1)
    assert ((cos >= 0.85 - 1e-6) & (cos <= 0.95 + 1e-6)).all()
    assert torch.allclose(dirs.norm(dim=-1), torch.ones(4, 2, dtype=torch.float64))
    # what the decoupled features add (the rest of the data is the same without them)
    base = make_diffing_data(cfg.replace(n_decoupled=0))
    added = (data.acts_NSD - base.acts_NSD).double()  # [N, 2, D]
    fired_base, fired_chat = added[:, 0].norm(dim=-1) > 0, added[:, 1].norm(dim=-1) > 0
    assert torch.equal(fired_base, fired_chat) and fired_base.float().mean() > 0.05
    # magnitudes in the two models are not proportional (decorrelated per token)
    ratio = added[fired_base, 1].norm(dim=-1) / added[fired_base, 0].norm(dim=-1)
    assert ratio.std() > 0.2
    assert data.categories[-1] == "shared"


def test_latent_scaling_relabels_only_false_exclusives():
    df = pd.DataFrame({
        "category": ["chat_only", "chat_only", "base_only", "base_only", "shared", "other"],
        "truly_chat_only": [True, False, False, False, False, False],
        "truly_base_only": [False, False, True, False, False, False],
    })
    assert with_latent_scaling(df).tolist() == [
        "chat_only", "shared", "base_only", "shared", "shared", "other"]


def test_config_errors_and_cli_flags():
    with pytest.raises(ConfigError, match="n_decoupled"):
        DiffingBenchConfig(n_decoupled=-1)
    with pytest.raises(ConfigError, match="unknown activation"):
        DiffingBenchConfig(activations=["gelu"])
    args = build_parser().parse_args(["bench", "diffing", "--activations", "relu", "--steps",
                                      "10", "--shifted", "4"])
    assert args.activations == ["relu"] and args.func is bench_cli.run_diffing
    assert args.shifted == 4


def test_tiny_benchmark_runs_and_prints(capsys):
    result = run_diffing_benchmark(_small(activations=["relu", "batchtopk"]))
    text = format_diffing_table(result)
    for needle in ("relu", "batchtopk", "rel_norm", "latent_scaling", "shared_decoupled 4",
                   "chat R/P", "what the exclusive latents write", "graded view",
                   "shared_weaker"):
        assert needle in text
    for res in result["results"].values():
        for lab in res["labels"].values():
            assert sum(lab["n_labelled"].values()) == res["alive"]
            assert all(0 <= v <= 1 for v in lab["recall"].values() if not np.isnan(v))
        # Latent Scaling can only remove exclusive labels, never add them
        plain, scaled = res["labels"]["rel_norm"], res["labels"]["latent_scaling"]
        for c in ("chat_only", "base_only"):
            assert scaled["n_labelled"][c] <= plain["n_labelled"][c]
        graded = res["graded"]
        assert graded["changed"]["shared_weaker"]["n"] <= 4 and graded["n_unchanged"] <= 6
        assert graded["n_false"] + graded["n_unexplained"] <= graded["n_discoveries"]


@pytest.mark.slow
def test_published_result_l1_inflates_and_latent_scaling_flags():
    """The full benchmark (minutes): L1 labels many more latents exclusive than BatchTopK,
    most of them write shrunk or decoupled shared features, and Latent Scaling removes
    most of those, raising the exclusive precision."""
    result = run_diffing_benchmark(DiffingBenchConfig())
    relu, btk = result["results"]["relu"]["labels"], result["results"]["batchtopk"]["labels"]
    n_excl = {name: lab["rel_norm"]["n_labelled"]["chat_only"] + lab["rel_norm"]["n_labelled"][
        "base_only"] for name, lab in (("relu", relu), ("btk", btk))}
    assert n_excl["relu"] > 2 * n_excl["btk"]
    for c in ("chat_only", "base_only"):
        assert relu["latent_scaling"]["precision"][c] > relu["rel_norm"]["precision"][c] + 0.3
        false_before = sum(n for k, n in relu["rel_norm"]["origin"][c].items()
                           if k in ("shared_weaker", DECOUPLED))
        false_after = sum(n for k, n in relu["latent_scaling"]["origin"][c].items()
                          if k in ("shared_weaker", DECOUPLED))
        assert false_after <= 0.25 * false_before
