"""Batches read ahead on a thread: same batches in the same order, errors surface, bounded."""

from __future__ import annotations

import itertools
import threading

import pytest
import torch

from crosscoders import CrosscoderConfig, TrainConfig, train
from crosscoders.errors import CrosscodersError, DataError
from crosscoders.train.prefetch import DeviceBatches, device_batches
from helpers import planted_acts

CPU = torch.device("cpu")


def _batches(n=10, dtype=torch.bfloat16):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(8, 2, 4, generator=gen).to(dtype) for _ in range(n)]


def test_same_batches_in_the_same_order_as_float32():
    source = _batches()
    got = list(DeviceBatches(iter(source), CPU, depth=3))
    assert len(got) == len(source)
    for a, b in zip(source, got):
        assert b.dtype == torch.float32 and torch.equal(a.float(), b)
    inline = list(device_batches(iter(source), CPU, 0))
    assert all(torch.equal(a, b) for a, b in zip(got, inline))


def test_next_after_the_end_keeps_raising_stop_iteration():
    batches = DeviceBatches(iter(_batches(2)), CPU, depth=2)
    assert len(list(batches)) == 2
    for _ in range(2):
        with pytest.raises(StopIteration):
            next(batches)


def test_float64_batches_stay_float64():
    source = _batches(3, torch.float64)
    assert all(b.dtype == torch.float64 for b in DeviceBatches(iter(source), CPU, 2))


def test_reads_at_most_depth_ahead_and_close_stops_the_thread():
    pulled = []

    def endless():
        for i in itertools.count():
            pulled.append(i)
            yield torch.zeros(2, 1, 1)

    batches = DeviceBatches(endless(), CPU, depth=2)
    next(batches)
    threading.Event().wait(0.3)  # let the thread fill the queue
    assert len(pulled) <= 1 + 2 + 1  # taken, queued, and one blocked on the full queue
    batches.close()
    assert not batches._thread.is_alive()


def test_an_error_in_the_reader_surfaces_as_itself():
    def failing():
        yield torch.zeros(2, 1, 1)
        raise DataError("shard 3 is corrupt; re-harvest it")

    batches = DeviceBatches(failing(), CPU, depth=2)
    next(batches)
    with pytest.raises(DataError, match="shard 3 is corrupt"):
        next(batches)


def test_a_reader_that_dies_silently_is_reported_not_waited_on(monkeypatch):
    monkeypatch.setattr(DeviceBatches, "_work", lambda self: None)
    batches = DeviceBatches(iter(_batches()), CPU, depth=2)
    with pytest.raises(CrosscodersError, match="stopped without a batch"):
        next(batches)


def test_training_with_prefetch_equals_inline_reading(tmp_path):
    acts, _ = planted_acts(n=2048)
    cfg = CrosscoderConfig(n_sources=2, d_model=16, dict_size=128, k=4)
    models = [train(cfg, acts.bfloat16(), TrainConfig(steps=30, batch_size=128, eval_tokens=128,
                                                      progress=False, prefetch=depth))
              for depth in (0, 2)]
    for name, value in models[0].state_dict().items():
        assert torch.equal(value, models[1].state_dict()[name]), name
