"""The reusable-buffer helper: views of the requested shape, reuse, growth, no carry-over."""

import copy
import pickle

import torch

from crosscoders.model.workspace import GROWTH, NO_REUSE, Workspace


def test_views_reuse_one_buffer_and_grow_when_too_small():
    ws = Workspace()
    a = ws.get("x", (4, 8), torch.float32, torch.device("cpu"))
    assert a.shape == (4, 8) and a.is_contiguous()
    smaller = ws.get("x", (3, 5), torch.float32, torch.device("cpu"))
    assert smaller.shape == (3, 5) and smaller.data_ptr() == a.data_ptr()  # reused
    larger = ws.get("x", (5, 8), torch.float32, torch.device("cpu"))
    assert larger.data_ptr() != a.data_ptr()  # grown, with room to spare
    assert ws._buffers["x"].numel() == int(40 * GROWTH) + 1
    again = ws.get("x", (6, 8), torch.float32, torch.device("cpu"))
    assert again.data_ptr() == larger.data_ptr()
    other = ws.get("x", (6, 8), torch.bfloat16, torch.device("cpu"))  # another dtype
    assert other.dtype == torch.bfloat16 and ws._buffers["x"].numel() == 48
    assert sorted(ws.names()) == ["x"]


def test_cached_values_follow_their_key():
    ws, calls = Workspace(), []

    def compute():
        calls.append(1)
        return len(calls)

    assert ws.cached("m", ("v", 1), compute) == 1
    assert ws.cached("m", ("v", 1), compute) == 1  # same key: reused
    assert ws.cached("m", ("v", 2), compute) == 2  # the key changed: recomputed
    assert ws.cached("m", None, compute) == 3  # no key: always computed
    assert NO_REUSE.cached("m", ("v", 2), compute) == 4


def test_no_reuse_hands_out_fresh_tensors_and_copies_start_empty():
    a = NO_REUSE.get("x", (4,), torch.float32, torch.device("cpu"))
    b = NO_REUSE.get("x", (4,), torch.float32, torch.device("cpu"))
    assert a.data_ptr() != b.data_ptr() and NO_REUSE.names() == []
    ws = Workspace()
    ws.get("x", (4,), torch.float32, torch.device("cpu"))
    assert copy.deepcopy(ws).names() == [] and pickle.loads(pickle.dumps(ws)).names() == []
    assert not pickle.loads(pickle.dumps(NO_REUSE)).reuse
