"""``crosscoders diff`` end to end: harvest a tiny store from two local models, train a
small crosscoder on it, run every part of the analysis through the CLI functions."""

from __future__ import annotations

import json
import sqlite3

import numpy as np
import pandas as pd
import pytest

from crosscoders import CrosscoderConfig, TrainConfig, train
from crosscoders.cli import main as cli_main
from crosscoders.cli.diff import default_store, parse_models
from crosscoders.diff.run import DiffConfig, resolve_pair, run_diff
from crosscoders.errors import ConfigError
from crosscoders.harvest import DataSpec, HarvestConfig, ModelSpec, harvest
from crosscoders.testing import make_model, make_tokenizer, write_text_corpus


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("diffrun")
    tok = make_tokenizer()
    make_model(root / "base", "llama", seed=0, tokenizer=tok, d_model=32, n_layers=3)
    make_model(root / "chat", "llama", seed=1, tokenizer=tok, d_model=32, n_layers=3)
    write_text_corpus(root / "text.jsonl", 120, seed=0)
    cfg = HarvestConfig(
        models=[ModelSpec(str(root / "base"), sites=["1"], name="base"),
                ModelSpec(str(root / "chat"), sites=["1"], name="chat")],
        data=[DataSpec(str(root / "text.jsonl"))], tokens=1200, context_length=24,
        batch_size=8, shard_tokens=400, store_dtype="float32", device="cpu", eval_tokens=0.1)
    store = harvest(cfg, root / "store", progress=False)
    cc = CrosscoderConfig(n_sources=2, d_model=32, dict_size=64, activation="batchtopk", k=4)
    train(cc, root / "store", TrainConfig(steps=30, batch_size=128, progress=False,
                                          eval_tokens=0), run_dir=root / "run")
    return root, store


def test_cli_writes_every_part(trained):
    root, store = trained
    assert cli_main(["diff", str(root / "run"), "--out", str(root / "diff"), "--models",
                     f"base={root / 'base'}", f"chat={root / 'chat'}",
                     "--steer-prompt", "the cat", "--no-progress", "--batch-size", "256"]) == 0
    out = root / "diff"
    df = pd.read_parquet(out / "latents.parquet")
    assert len(df) == 64 and {"latent", "rel_norm", "cos", "category"} <= set(df)
    np.testing.assert_array_equal(df["cos"], df["dec_cos"])
    assert {"dec_cos", "nu_r", "freq", "special_share"} <= set(df)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_tokens"] == store.n_tokens
    assert set(summary["fvu"]) == {"source_0", "source_1"}
    assert sum(summary["counts"].values()) == 64
    sim = json.loads((out / "similarity.json").read_text())
    assert sim["rows"] == ["base/resid_out:1"] and sim["cols"] == ["chat/resid_out:1"]
    assert 0 < sim["cka"][0][0] <= 1
    causal = json.loads((out / "causal.json").read_text())
    splice = causal["splice"]["chat/resid_out:1"]
    assert splice["ce_zero_ablation"] > splice["ce_clean"]
    assert {"none", "chat_only", "truly_chat_only", "shared_control", "all"} == set(
        causal["patch_test"])
    lens = json.loads((out / "lens.json").read_text())
    assert len(lens["promoted"]) == 20 and isinstance(lens["promoted"][0]["token"], str)
    steering = json.loads((out / "steering.json").read_text()) if (
        out / "steering.json").exists() else []
    assert all(r["prompt"] == "the cat" for r in steering)
    con = sqlite3.connect(out / "examples.db")
    n, kinds = con.execute("SELECT COUNT(*), COUNT(DISTINCT kind) FROM examples").fetchone()
    row = con.execute("SELECT row, center, tokens, acts, text FROM examples LIMIT 1").fetchone()
    con.close()
    if n:
        tokens, acts, text = json.loads(row[2]), json.loads(row[3]), json.loads(row[4])
        assert tokens[row[1]] == int(store.tokens[row[0]])
        assert len(acts) == len(tokens) and text is not None
    assert (out / "diff_config.json").exists()


def test_run_diff_on_a_tensor_and_max_tokens(trained, tmp_path):
    root, store = trained
    x = store.rows(0, 500)
    summary = run_diff(root / "run", x, tmp_path / "t",
                       DiffConfig(examples="all", progress=False, n_top=3, n_samples=2))
    assert summary["n_tokens"] == 500
    summary = run_diff(root / "run", store, tmp_path / "s",
                       DiffConfig(examples="none", max_tokens=300, progress=False))
    assert summary["n_tokens"] == 300
    assert not (tmp_path / "s" / "examples.db").exists()


def test_resolve_pair_and_errors(trained):
    root, store = trained
    from crosscoders import Crosscoder

    model = Crosscoder.load(root / "run")
    srcs = store.manifest["sources"]
    assert resolve_pair(model, srcs, None, None) == (0, 1)
    assert resolve_pair(model, srcs, "chat", "base") == (1, 0)
    assert resolve_pair(model, srcs, "chat/resid_out:1", None) == (1, 0)
    with pytest.raises(ConfigError, match="no source 'sft'"):
        resolve_pair(model, srcs, "sft", None)
    with pytest.raises(ConfigError, match="latent_scaling"):
        DiffConfig(latent_scaling="some")
    with pytest.raises(ConfigError, match="lacks"):
        run_diff(model, store, root / "x", DiffConfig(progress=False, examples="none"),
                 models={"base": str(root / "base")})


def test_cli_defaults_store_and_models(trained):
    root, store = trained
    assert default_store(str(root / "run")) == str((root / "store").resolve())
    with pytest.raises(ConfigError, match="--store"):
        default_store(str(root / "nowhere"))
    auto = parse_models(["auto"], store.manifest)
    assert auto == {"base": str(root / "base"), "chat": str(root / "chat")}
    assert parse_models(["/b", "chat=/c"], store.manifest) == {"base": "/b", "chat": "/c"}
    assert parse_models(None, store.manifest) is None
    with pytest.raises(ConfigError, match="NAME=PATH"):
        parse_models(["/a", "/b", "/c"], store.manifest)
