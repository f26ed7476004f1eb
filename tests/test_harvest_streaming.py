"""StreamingSource: the ActivationSource protocol without a store, and the CLI entry."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from crosscoders.cli import build_parser
from crosscoders.cli import main as cli_main
from crosscoders.cli.harvest import harvest_config
from crosscoders.data import ActivationSource, ordered_batches
from crosscoders.errors import ConfigError, DataError
from crosscoders.harvest import DataSpec, HarvestConfig, ModelSpec, StreamingSource, harvest
from crosscoders.store import ActivationStore
from crosscoders.testing import make_model, make_tokenizer, write_text_corpus


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    tok = make_tokenizer()
    make_model(root / "base", "gpt2", seed=0, tokenizer=tok)
    make_model(root / "chat", "gpt2", seed=1, tokenizer=tok)
    write_text_corpus(root / "text.jsonl", 80, seed=1)
    return root


def _config(root, **changes) -> HarvestConfig:
    cfg = HarvestConfig(
        models=[
            ModelSpec(str(root / "base"), sites=["2"], name="base"),
            ModelSpec(str(root / "chat"), sites=["2"], name="chat"),
        ],
        data=[DataSpec(str(root / "text.jsonl"))],
        tokens=600,
        context_length=16,
        batch_size=4,
        store_dtype="float32",
        device="cpu",
        eval_tokens=40,
    )
    return dataclasses.replace(cfg, **changes)


def _key(rows: torch.Tensor) -> list[tuple[float, ...]]:
    return sorted(tuple(r) for r in rows[:, 0, :4].tolist())


def test_streaming_source_matches_the_store(root, tmp_path):
    cfg = _config(root)
    source = StreamingSource(cfg, buffer_tokens=128)
    assert isinstance(source, ActivationSource)
    assert (source.n_sources, source.d_model) == (2, 32)
    store = harvest(dataclasses.replace(cfg, eval_tokens=0), tmp_path / "s", progress=False)
    full = store.rows(0, store.n_tokens)

    evals = torch.cat(list(source.eval_batches(16)))
    torch.testing.assert_close(evals, full[:40], rtol=0, atol=1e-6)  # the first 40 positions
    it = source.batches(32, seed=7)
    first_window = torch.cat([next(it) for _ in range(4)])  # 128 rows = one shuffled window
    assert first_window.shape == (128, 2, 32)
    assert _key(first_window) == _key(full[40:168])
    assert not torch.equal(first_window, full[40:168])
    later = [next(it) for _ in range(20)]  # wraps around into the next epoch
    resumed = source.batches(32, seed=7, start=9)
    for expected in later[5:8]:
        assert torch.equal(next(resumed), expected)
    assert source.mean_squared_norm() is None
    assert source.sample(50, seed=0).shape == (50, 2, 32)
    assert source.describe()["kind"] == "streaming"
    # in order: one epoch's positions (held-out first), as the store holds them
    assert source.n_tokens is None
    in_order = torch.cat([x for _, x in ordered_batches(source, 100)])
    torch.testing.assert_close(in_order, full, rtol=0, atol=1e-6)
    with pytest.raises(DataError, match="StreamingSource reads its rows in order only.*harvest"):
        source.gather(np.array([0, 5]))
    source.close()


def test_streaming_refuses_sequential(root):
    with pytest.raises(ConfigError, match="streaming needs every model loaded"):
        StreamingSource(_config(root, sequential=True))


def test_cli_builds_the_config_and_harvests(root, tmp_path, capsys):
    argv = ["harvest", "--base", str(root / "base"), "--chat", str(root / "chat"),
            "--layers", "0.5", "-1", "--data", str(root / "text.jsonl"), "--tokens", "300",
            "--context-length", "16", "--out", str(tmp_path / "store"),
            "--store-dtype", "float16", "--device", "cpu", "--eval-tokens", "0.1",
            "--skip-first", "1", "--no-progress"]
    cfg = harvest_config(build_parser().parse_args(argv))
    assert [m.name for m in cfg.models] == ["base", "chat"]
    assert cfg.models[1].sites == ["0.5", "-1"] and cfg.eval_tokens == 0.1 and cfg.skip_first == 1
    assert cli_main(argv) == 0
    store = ActivationStore.open(tmp_path / "store")
    assert store.n_tokens == 300 and store.n_sources == 4 and store.dtype == "float16"
    assert "300 tokens x 4 sources" in capsys.readouterr().out
    bad = build_parser().parse_args(["harvest", "--data", "x.jsonl", "--out", str(tmp_path / "o")])
    with pytest.raises(ConfigError, match="no models: give --base and --chat"):
        harvest_config(bad)
