"""The shuffled reader's contract: the same rows in the same order for a seed (recorded before
the reader was parallelised), exact resume, bounded memory, and a failing read surfaced."""

from __future__ import annotations

import hashlib
import threading
import tracemalloc

import numpy as np
import pytest
import torch

from crosscoders.errors import DataError
from crosscoders.store import ActivationStore
from crosscoders.store.shuffle import ShufflePlan
from test_store import write_store

# sha256 (first 16 hex) of the first 30 batches of 8 rows, recorded from the reader before it
# read windows over several threads: (dtype, seed, start batch, shard) -> digest.
RECORDED = {
    ("float32", 0, 0, None): "2a87d4cd58b19f73",
    ("float32", 0, 0, (1, 2)): "cf73e7b50ab94644",
    ("float32", 0, 5, None): "2de66581dcf932ce",
    ("float32", 0, 5, (1, 2)): "e091184bc46811af",
    ("float32", 3, 0, None): "c5292c0d50b9f10d",
    ("float32", 3, 0, (1, 2)): "3c66bc6cc9fba5ea",
    ("float32", 3, 5, None): "cc6394bacee9e231",
    ("float32", 3, 5, (1, 2)): "1f492c298108bda6",
    ("bfloat16", 0, 0, None): "3ad14f0391554bab",
    ("bfloat16", 0, 0, (1, 2)): "01f40b1191529bb9",
    ("bfloat16", 0, 5, None): "4ff4f5828bcb90c9",
    ("bfloat16", 0, 5, (1, 2)): "707a3993e33bef12",
    ("bfloat16", 3, 0, None): "7db2d1249332233b",
    ("bfloat16", 3, 0, (1, 2)): "3042c182fc2afdda",
    ("bfloat16", 3, 5, None): "1f59e5fa1e3749f7",
    ("bfloat16", 3, 5, (1, 2)): "1badaa86f80b5813",
}


def _store(tmp_path, dtype: str) -> ActivationStore:
    data = np.random.default_rng(0).standard_normal((100, 2, 8)).astype(np.float32)
    store = write_store(tmp_path / dtype, data, dtype=dtype, eval_tokens=10)
    store.chunk_rows, store.window_rows = 7, 30  # several chunks per window, several windows
    return store


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_batches_are_the_recorded_rows_in_the_recorded_order(tmp_path, dtype):
    store = _store(tmp_path, dtype)
    for (kind, seed, start, shard), digest in RECORDED.items():
        if kind != dtype:
            continue
        batches = store.batches(8, seed, start, shard=shard)
        h = hashlib.sha256()
        for _ in range(30):
            h.update(next(batches).numpy().tobytes())
        assert h.hexdigest()[:16] == digest, (seed, start, shard)


def test_batches_follow_the_shuffle_plan_row_by_row(tmp_path):
    """Independent of the digests: the stream is the plan's windows, each in its order."""
    store = _store(tmp_path, "float32")
    plan = ShufflePlan(store.n_train, store.chunk_rows, store.window_rows, seed=4)
    expected = []
    for window, offset in plan.windows_from(0):
        rows = np.concatenate([np.arange(a, b) for a, b in window.ranges])
        expected.extend(rows[window.order[offset:]].tolist())
        if len(expected) >= 40 * 8:
            break
    batches = store.batches(8, seed=4)
    got = torch.cat([next(batches) for _ in range(40)])
    assert torch.equal(got, store.gather(np.array(expected[: 40 * 8])))


def test_resume_at_batch_k_equals_the_rest_of_a_fresh_stream(tmp_path):
    store = _store(tmp_path, "bfloat16")
    fresh = store.batches(8, seed=1)
    stream = [next(fresh) for _ in range(35)]
    for k in (1, 4, 11, 12, 23):  # inside windows, at window and epoch boundaries
        resumed = store.batches(8, seed=1, start=k)
        for n in range(k, min(k + 8, 35)):
            assert torch.equal(next(resumed), stream[n]), (k, n)


def test_peak_memory_does_not_grow_with_the_store(tmp_path):
    """Host memory of a running reader is a few windows, whatever the store's size."""
    peaks = []
    for n in (2000, 8000):
        data = np.random.default_rng(0).standard_normal((n, 2, 8)).astype(np.float32)
        store = write_store(tmp_path / str(n), data, shard_rows=(n // 2, n // 2))
        store.chunk_rows, store.window_rows = 50, 400
        batches = store.batches(64, seed=0)
        next(batches)
        tracemalloc.start()
        for _ in range(2 * n // 64):  # two epochs
            next(batches)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        batches.close()
    window_bytes = 400 * 2 * 8 * 4
    assert peaks[1] < 8 * window_bytes + 256 * 1024, peaks
    assert peaks[1] < 1.5 * peaks[0] + 64 * 1024, peaks  # 4x the rows, not 4x the memory


def test_a_failing_window_read_reaches_the_consumer(tmp_path, monkeypatch):
    store = _store(tmp_path, "float32")
    calls = []

    def broken(*args, **kwargs):
        calls.append(threading.current_thread().name)
        raise DataError("shard 0 (shards/00000/acts_0.npy) vanished; re-harvest the store")

    monkeypatch.setattr(store, "_read_into", broken)
    result: list[BaseException] = []

    def consume() -> None:
        try:
            next(store.batches(8, seed=0))
        except BaseException as err:
            result.append(err)

    thread = threading.Thread(target=consume, daemon=True)
    thread.start()
    thread.join(timeout=20)
    assert not thread.is_alive(), "the reader hung instead of raising"
    assert calls and isinstance(result[0], DataError) and "vanished" in str(result[0])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_threads_change_the_speed_not_the_batches(tmp_path, dtype):
    """Reads and gathers split over threads (batches large enough to split) give the same
    rows as one thread, for whole batches and a data-parallel rank's part."""
    data = np.random.default_rng(2).standard_normal((3000, 2, 8)).astype(np.float32)
    store = write_store(tmp_path / dtype, data, shard_rows=(1000, 1000, 1000), dtype=dtype)
    store.chunk_rows, store.window_rows = 40, 900
    streams = []
    for threads in (1, 3):
        store.read_threads = threads
        for shard in (None, (0, 2)):
            batches = store.batches(1024, seed=5, start=1, shard=shard)
            streams.append([next(batches) for _ in range(6)])
    for one, many in zip(streams[:2], streams[2:], strict=True):
        assert all(torch.equal(a, b) for a, b in zip(one, many, strict=True))
