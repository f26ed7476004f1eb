"""Activation store: writer/reader round trips, shuffling, splits, statistics, validation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from crosscoders.data import ActivationSource
from crosscoders.errors import ConfigError, DataError
from crosscoders.store import ActivationStore, ShardMeta, StoreWriter
from crosscoders.store import format as fmt

S, D, T = 2, 8, 10  # sources, d_model, context length


def _meta(n: int, row0: int, seq0: int) -> ShardMeta:
    """Rows ``row0 .. row0 + n`` laid out as contexts of T tokens, token id = row index % 1000."""
    rows = np.zeros(n, fmt.ROW_DTYPE)
    index = np.arange(row0, row0 + n)
    rows["token"] = index % 1000
    rows["context"] = index // T
    rows["position"] = index % T
    rows["doc"] = index // 25
    rows["doc_pos"] = index % 25
    seq_start, seq_end = seq0, (row0 + n - 1) // T + 1
    contexts = (np.arange(seq_start * T, seq_end * T) % 1000).reshape(-1, T).astype(np.int32)
    return ShardMeta(rows, contexts, seq_start, seq_end, {"bos": 1})


def write_store(
    path, data_NSD: np.ndarray, shard_rows=(30, 30, 40), dtype="float32", eval_tokens=0
) -> ActivationStore:
    """A store holding ``data_NSD`` in shards of the given sizes (multiples of T)."""
    writer = StoreWriter(path, {"test": 1}, n_sources=S, d_model=D, dtype=dtype)
    row = 0
    for k, n in enumerate(shard_rows):
        meta = _meta(n, row, row // T)
        acts = {
            s: fmt.to_storage(torch.from_numpy(data_NSD[row : row + n, s]), dtype) for s in range(S)
        }
        writer.commit(k, "m", acts, meta)
        row += n
    writer.end(len(shard_rows), row)
    writer.finalize(
        {"sources": [{"name": f"src{s}"} for s in range(S)], "eval_tokens": eval_tokens}
    )
    return ActivationStore.open(path)


@pytest.fixture
def data() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((100, S, D)).astype(np.float32)


def test_round_trip_rows_tokens_and_provenance(tmp_path, data):
    store = write_store(tmp_path / "s", data)
    assert isinstance(store, ActivationSource)
    assert (store.n_tokens, store.n_sources, store.d_model) == (100, S, D)
    assert torch.equal(store.rows(0, 100), torch.from_numpy(data))
    assert torch.equal(store.rows(25, 75), torch.from_numpy(data[25:75]))  # spans shards
    assert torch.equal(store.gather(np.array([99, 3, 50])), torch.from_numpy(data[[99, 3, 50]]))
    np.testing.assert_array_equal(store.tokens, np.arange(100))
    assert store.locate(57) == {
        "token": 57,
        "context": 5,
        "position": 7,
        "doc": 2,
        "doc_pos": 7,
        "dataset": 0,
    }
    ids, where = store.context(57, before=3, after=1)
    np.testing.assert_array_equal(ids, [54, 55, 56, 57, 58])
    assert where == 3
    assert store.manifest["masked"] == {"bos": 3}


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_round_trip(tmp_path, data, dtype):
    store = write_store(tmp_path / "s", data, dtype=dtype)
    expected = torch.from_numpy(data).to(fmt.torch_dtype(dtype)).float()
    assert torch.equal(store.rows(0, 100), expected)
    assert store.row_bytes == S * D * 2


def test_stats_are_over_the_training_split(tmp_path, data):
    store = write_store(tmp_path / "s", data, eval_tokens=20)
    assert (store.n_train, store.n_eval) == (80, 20)
    train = torch.from_numpy(data[:80]).double()
    expected = (train**2).sum(-1).mean(0)
    torch.testing.assert_close(store.mean_squared_norm().double(), expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(store.mean().double(), train.mean(0), rtol=1e-5, atol=1e-7)


def test_eval_split_is_held_out_and_rounded_to_a_context(tmp_path, data):
    store = write_store(tmp_path / "s", data, eval_tokens=0.15)
    # 15 rows asked; the boundary (row 85) moves back to the start of its context (row 80).
    assert (store.n_train, store.n_eval) == (80, 20)
    evals = torch.cat(list(store.eval_batches(7)))
    assert torch.equal(evals, torch.from_numpy(data[80:]))
    seen = torch.cat([b for _, b in zip(range(20), store.batches(8, seed=1), strict=False)])
    train_rows = {tuple(r) for r in data[:80, 0].tolist()}
    assert all(tuple(r) in train_rows for r in seen[:, 0].tolist())
    reopened = ActivationStore.open(tmp_path / "s", eval_tokens=0)
    assert reopened.n_eval == 0 and list(reopened.eval_batches(4)) == []
    with pytest.raises(DataError, match="leaves no training tokens"):
        ActivationStore.open(tmp_path / "s", eval_tokens=100)


def _epoch(store, batch_size, seed, n_batches, start=0):
    it = store.batches(batch_size, seed=seed, start=start)
    return torch.cat([next(it) for _ in range(n_batches)])


def test_batches_shuffle_each_epoch_once_deterministically(tmp_path, data):
    store = write_store(tmp_path / "s", data)
    store.chunk_rows, store.window_rows = 8, 24  # several windows
    one = _epoch(store, 10, seed=3, n_batches=20)  # two epochs of 100 rows
    assert one.shape == (200, S, D) and one.dtype == torch.float32
    for epoch in (one[:100], one[100:]):  # each epoch is a permutation of all rows
        assert sorted(epoch[:, 0, 0].tolist()) == sorted(data[:, 0, 0].tolist())
    assert not torch.equal(one[:100], one[100:])  # new shuffle each epoch
    assert not torch.equal(one[:100], torch.from_numpy(data))
    assert torch.equal(one, _epoch(store, 10, seed=3, n_batches=20))
    assert not torch.equal(one, _epoch(store, 10, seed=4, n_batches=20))


def test_batches_resume_at_any_batch_without_reading_earlier_windows(tmp_path, data, monkeypatch):
    store = write_store(tmp_path / "s", data)
    store.chunk_rows, store.window_rows = 8, 16
    full = _epoch(store, 7, seed=0, n_batches=40)
    loaded = []
    original = ActivationStore._load_window

    def counting(self, window, *args):
        loaded.append((window.epoch, window.index))
        return original(self, window, *args)

    monkeypatch.setattr(ActivationStore, "_load_window", counting)
    for start in (0, 1, 13, 29):
        loaded.clear()
        resumed = _epoch(store, 7, seed=0, n_batches=3, start=start)
        assert torch.equal(resumed, full[start * 7 : (start + 3) * 7])
    # Batch 29 (rows 203..209 of the stream) is in epoch 2: only its windows were read.
    assert all(epoch == 2 for epoch, _ in loaded)
    assert len(loaded) <= 4


def test_sample_draws_distinct_training_rows(tmp_path, data):
    store = write_store(tmp_path / "s", data, eval_tokens=20)
    sample = store.sample(50, seed=1)
    assert sample.shape == (50, S, D)
    firsts = sample[:, 0, 0].tolist()
    assert len(set(firsts)) == 50
    assert set(firsts) <= set(data[:80, 0, 0].tolist())
    assert torch.equal(sample, store.sample(50, seed=1))
    assert store.sample(10**6, seed=0).shape[0] == 80


def test_describe_identifies_the_data(tmp_path, data):
    a = write_store(tmp_path / "a", data).describe()
    b = write_store(tmp_path / "b", data + 1).describe()
    json.dumps(a)
    assert a["n_tokens"] == 100 and a["sources"] == ["src0", "src1"]
    assert a["manifest_sha256"] != b["manifest_sha256"]


def test_truncated_shard_is_named(tmp_path, data):
    write_store(tmp_path / "s", data)
    path = fmt.shard_dir(tmp_path / "s", 1) / "acts_1.npy"
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size - 16)
    with pytest.raises(DataError, match=r"shard 1 \(shards/00001/acts_1.npy\) is truncated"):
        ActivationStore.open(tmp_path / "s")


def test_corrupt_bytes_are_caught_by_full_verification(tmp_path, data):
    write_store(tmp_path / "s", data)
    path = fmt.shard_dir(tmp_path / "s", 2) / "acts_0.npy"
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0xFF
    path.write_bytes(bytes(raw))
    ActivationStore.open(tmp_path / "s")  # quick check: sizes and headers are fine
    with pytest.raises(DataError, match=r"shard 2 .*acts_0.npy\) is corrupt: its sha256"):
        ActivationStore.open(tmp_path / "s", verify="full")


def test_missing_shard_file_and_non_stores(tmp_path, data):
    write_store(tmp_path / "s", data)
    (fmt.shard_dir(tmp_path / "s", 0) / "rows.npy").unlink()
    with pytest.raises(DataError, match=r"shard 0 \(shards/00000/rows.npy\) is missing"):
        ActivationStore.open(tmp_path / "s")
    with pytest.raises(DataError, match="is not an activation store .does not exist"):
        ActivationStore.open(tmp_path / "nowhere")


def test_incomplete_store_says_how_to_resume(tmp_path, data):
    writer = StoreWriter(tmp_path / "s", {"test": 1}, n_sources=S, d_model=D, dtype="float32")
    acts = {s: data[:30, s] for s in range(S)}
    writer.commit(0, "m", acts, _meta(30, 0, 0))
    with pytest.raises(DataError, match="incomplete.*after 1 shard.*run the same harvest command"):
        ActivationStore.open(tmp_path / "s")


def test_writer_refuses_a_directory_of_another_config(tmp_path, data):
    write_store(tmp_path / "s", data)
    with pytest.raises(ConfigError, match="harvested with another config .differs in: test"):
        StoreWriter(tmp_path / "s", {"test": 2}, n_sources=S, d_model=D, dtype="float32")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("hi")
    with pytest.raises(ConfigError, match="not empty and holds no activation store"):
        StoreWriter(tmp_path / "other", {"test": 1}, n_sources=S, d_model=D, dtype="float32")


def test_writer_removes_temp_files_of_a_killed_write(tmp_path, data):
    writer = StoreWriter(tmp_path / "s", {"test": 1}, n_sources=S, d_model=D, dtype="float32")
    writer.commit(0, "m", {s: data[:30, s] for s in range(S)}, _meta(30, 0, 0))
    leftover = fmt.shard_dir(tmp_path / "s", 1)
    leftover.mkdir(parents=True)
    (leftover / ".acts_0.npy.abc.tmp").write_bytes(b"half")
    again = StoreWriter(tmp_path / "s", {"test": 1}, n_sources=S, d_model=D, dtype="float32")
    assert again.done("m") == 1 and again.seq_start(1) == 3
    assert not (leftover / ".acts_0.npy.abc.tmp").exists()


def test_cli_trains_on_a_store_with_its_source_names(tmp_path, data):
    from crosscoders import Crosscoder
    from crosscoders.cli import main as cli_main

    write_store(tmp_path / "store", data, eval_tokens=20)
    out = tmp_path / "run"
    argv = ["train", "--data", str(tmp_path / "store"), "--out", str(out), "--dict-size",
            "16", "--k", "2", "--steps", "5", "--batch-size", "16", "--no-progress"]
    assert cli_main(argv) == 0
    model = Crosscoder.load(out)
    assert model.config.source_names == [f"src{s}" for s in range(S)]
    assert model.W_dec.shape == (16, S, D)
