"""Store writer internals: .npy files hashed from memory, parallel shard writes, and the
background commits (shards written at once, recorded in order behind a bounded queue,
errors handed back to the caller)."""

from __future__ import annotations

import errno
import hashlib
import io
import threading
import time

import numpy as np
import pytest
import torch

from crosscoders.errors import CrosscodersError
from crosscoders.store import ActivationStore, ShardMeta, StoreWriter
from crosscoders.store import format as fmt
from crosscoders.store import writer as writer_mod
from crosscoders.store.writer import BackgroundCommits, _save_npy, shard_stats


def _arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    rows = np.zeros(37, fmt.ROW_DTYPE)
    rows["token"] = rng.integers(0, 1000, 37)
    rows["context"] = np.arange(37) // 5
    x = torch.from_numpy(rng.standard_normal((37, 24)).astype(np.float32))
    return {
        "bf16": fmt.to_storage(x, "bfloat16"),
        "f16": fmt.to_storage(x, "float16"),
        "f32": fmt.to_storage(x, "float32"),
        "strided": x.numpy()[:, ::2],  # not contiguous: written in C order, as np.save does
        "rows": rows,
        "contexts": rng.integers(-1, 100, (8, 10)).astype(np.int32),
        "stats": rng.standard_normal(25),
        "empty": np.empty((0, 24), np.uint16),
        "big": rng.integers(0, 1 << 16, (3, (1 << 21) + 5)).astype(np.uint16),  # > one chunk
    }


@pytest.mark.parametrize("kind", list(_arrays()))
def test_save_npy_writes_np_save_bytes_and_hashes_them(tmp_path, kind):
    array = _arrays()[kind]
    info = _save_npy(tmp_path / "a.npy", array)
    expected = io.BytesIO()
    np.save(expected, array, allow_pickle=False)
    raw = (tmp_path / "a.npy").read_bytes()
    assert raw == expected.getvalue()
    assert info == {"sha256": hashlib.sha256(raw).hexdigest(), "bytes": len(raw)}
    assert info["sha256"] == fmt.sha256_file(tmp_path / "a.npy")
    assert [p.name for p in tmp_path.iterdir()] == ["a.npy"]  # no temporary file left


def _meta(n: int) -> ShardMeta:
    rows = np.zeros(n, fmt.ROW_DTYPE)
    rows["token"] = np.arange(n)
    rows["context"] = np.arange(n) // 10
    rows["position"] = np.arange(n) % 10
    contexts = np.arange((n + 9) // 10 * 10, dtype=np.int32).reshape(-1, 10)
    return ShardMeta(rows, contexts, 0, contexts.shape[0], {"bos": 2})


def test_commit_shard_equals_one_commit_per_group(tmp_path):
    """Writing every group's files at once gives the store (and manifest) that committing
    the groups one by one gives."""
    rng = np.random.default_rng(1)
    acts = {s: rng.standard_normal((40, 8)).astype(np.float32) for s in range(3)}
    groups = {"base": [0, 1], "chat": [2]}
    manifests = []
    for how in ("one_by_one", "together"):
        writer = StoreWriter(tmp_path / how, {"t": 1}, n_sources=3, d_model=8, dtype="float32")
        parts = {g: ({s: acts[s] for s in ss}, None) for g, ss in groups.items()}
        if how == "together":
            writer.commit_shard(0, parts, _meta(40))
        else:
            for g, (a, _) in parts.items():
                writer.commit(0, g, a, _meta(40))
        writer.end(1, 40)
        manifests.append(writer.finalize({"sources": [{"name": str(s)} for s in range(3)],
                                          "eval_tokens": 0}))
    assert manifests[0] == manifests[1]
    store = ActivationStore.open(tmp_path / "together", verify="full")
    expected = np.stack([acts[s] for s in range(3)], 1)
    assert torch.equal(store.rows(0, 40), torch.from_numpy(expected))
    np.testing.assert_array_equal(
        np.load(tmp_path / "together" / "shards" / "00000" / "stats_2.npy"),
        shard_stats(acts[2], "float32"))


def test_disk_full_in_a_parallel_write_names_the_shard(tmp_path, monkeypatch):
    real = writer_mod._save_npy

    def failing(path, array):
        if path.name == "acts_1.npy":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, array)

    monkeypatch.setattr(writer_mod, "_save_npy", failing)
    writer = StoreWriter(tmp_path / "s", {"t": 1}, n_sources=2, d_model=8, dtype="float32")
    parts = {"m": ({s: np.ones((20, 8), np.float32) for s in range(2)}, None)}
    with pytest.raises(CrosscodersError, match="disk full while writing shard 0 of .*resumes"):
        writer.commit_shard(0, parts, _meta(20))
    assert writer.done("m") == 0 and writer.n_shards_known == 0
    assert not list((tmp_path / "s").glob("shards/*/.*.tmp"))


def _nothing() -> None:
    return None


def test_background_commits_write_at_once_and_record_in_order():
    gate = threading.Event()
    recorded: list[int] = []
    written: list[int] = []
    commits = BackgroundCommits(depth=2)

    def write(i: int) -> int:
        if i == 0:
            gate.wait(10)  # the first shard's write is slow ...
        written.append(i)
        return i

    for i in range(3):
        commits.submit(lambda i=i: write(i), recorded.append)
    deadline = time.time() + 10
    while written != [1, 2] and time.time() < deadline:
        time.sleep(0.01)
    assert written == [1, 2] and recorded == []  # ... later ones are written meanwhile,
    blocked = threading.Thread(target=commits.submit, args=(lambda: write(3), recorded.append))
    blocked.start()
    blocked.join(0.3)
    assert blocked.is_alive()  # ... the queue is full, so submit waits (bounded memory),
    gate.set()
    blocked.join(10)
    commits.close()
    assert recorded == [0, 1, 2, 3]  # ... and the shards are recorded in order


def test_background_commits_hand_the_first_error_back_and_drop_later_shards():
    commits = BackgroundCommits(depth=2)
    recorded: list[int] = []

    def fail() -> None:
        raise CrosscodersError("disk full while writing shard 3: free some space")

    commits.submit(fail, recorded.append)
    deadline = time.time() + 10
    while commits._error is None and time.time() < deadline:
        time.sleep(0.01)
    with pytest.raises(CrosscodersError, match="disk full while writing shard 3"):
        commits.submit(lambda: 4, recorded.append)
    with pytest.raises(CrosscodersError, match="disk full while writing shard 3"):
        commits.close()
    assert recorded == []
    commits.stop()  # never raises, returns at once
    assert not commits._thread.is_alive()


def test_background_commits_report_the_earliest_failing_shard():
    """A later shard that fails first (its write was quicker) is not the one reported."""
    gate = threading.Event()
    commits = BackgroundCommits(depth=2)

    def slow_fail() -> None:
        gate.wait(10)
        raise CrosscodersError("shard 0 failed")

    def quick_fail() -> None:
        raise CrosscodersError("shard 1 failed")

    commits.submit(slow_fail, _nothing)
    commits.submit(quick_fail, _nothing)
    time.sleep(0.1)
    gate.set()
    with pytest.raises(CrosscodersError, match="shard 0 failed"):
        commits.close()


def test_background_commits_stop_drops_waiting_shards():
    gate = threading.Event()
    recorded: list[int] = []
    commits = BackgroundCommits(depth=1)  # two write threads: the third shard waits
    commits.submit(lambda: gate.wait(10) and 0, recorded.append)
    commits.submit(lambda: gate.wait(10) and 1, recorded.append)
    blocked = threading.Thread(target=commits.submit, args=(lambda: 2, recorded.append))
    blocked.start()  # blocks: the queue is full
    time.sleep(0.1)
    stopping = threading.Thread(target=commits.stop)
    stopping.start()
    while not commits._cancel:
        time.sleep(0.01)
    gate.set()
    stopping.join(10)
    blocked.join(10)
    assert recorded == []  # nothing recorded after stop; the running writes finished
    assert not stopping.is_alive() and not blocked.is_alive() and not commits._thread.is_alive()


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_shard_stats_are_float64_sums_of_the_stored_values(monkeypatch, dtype):
    monkeypatch.setattr(writer_mod, "_STATS_ELEMENTS", 64)  # many blocks of rows
    x = np.random.default_rng(2).standard_normal((301, 2, 24)).astype(np.float32) * 5
    stored = fmt.to_storage(torch.from_numpy(x), dtype)[:, 1]  # strided, as the tests pass
    ref = fmt.to_float32(np.ascontiguousarray(stored), dtype).double()
    expected = np.append(ref.sum(0).numpy(), float((ref * ref).sum()))
    np.testing.assert_allclose(shard_stats(stored, dtype), expected, rtol=1e-13, atol=1e-12)
