"""The one activation-data protocol: a tensor, a store, an iterable and a head of a source
read alike; what a source cannot do is a one-line DataError; no import cycle."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from crosscoders import Crosscoder, CrosscoderConfig
from crosscoders.data import (
    ActivationSource,
    Head,
    IterableSource,
    TensorSource,
    as_source,
    ordered_batches,
)
from crosscoders.diff.stats import ActivationStats, analysis_pass
from crosscoders.errors import DataError
from crosscoders.store import ActivationStore, ShardMeta, StoreWriter
from crosscoders.store import format as fmt

T = 10  # context length; every position is stored, one document per context
SRC = Path(__file__).resolve().parents[1] / "src"


def write_store(path: Path, acts_NSD: np.ndarray, shard_rows=(30, 40, 30),
                eval_tokens: int = 0) -> ActivationStore:
    """A store of ``acts_NSD`` whose row ``i`` is token ``500 + i`` at position ``i % T`` of
    context (and document) ``i // T``."""
    S, D = acts_NSD.shape[1:]
    writer = StoreWriter(path, {"test": 1}, n_sources=S, d_model=D, dtype="float32")
    row = 0
    for k, n in enumerate(shard_rows):
        index = np.arange(row, row + n)
        rows = np.zeros(n, fmt.ROW_DTYPE)
        rows["token"] = 500 + index
        rows["context"] = rows["doc"] = index // T
        rows["position"] = rows["doc_pos"] = index % T
        contexts = (500 + index).reshape(-1, T).astype(np.int32)
        acts = {s: np.ascontiguousarray(acts_NSD[row: row + n, s]) for s in range(S)}
        writer.commit(k, "m", acts, ShardMeta(rows, contexts, row // T, (row + n) // T))
        row += n
    writer.end(len(shard_rows), row)
    writer.finalize({"sources": [{"name": f"s{s}"} for s in range(S)],
                     "eval_tokens": eval_tokens})
    return ActivationStore.open(path)


def _index_acts(n: int, S: int = 2, D: int = 3) -> np.ndarray:
    """[n, S, D] whose every entry of row i is i: a read's values name its rows."""
    return np.repeat(np.arange(n, dtype=np.float32)[:, None, None], S, 1).repeat(D, 2)


@pytest.fixture
def pair(tmp_path):
    """The same 100 rows as a store and as a tensor source with its token and document ids."""
    acts = np.random.default_rng(0).standard_normal((100, 2, 8)).astype(np.float32)
    store = write_store(tmp_path / "store", acts)
    index = np.arange(100)
    tensor = TensorSource(torch.from_numpy(acts), token_ids=500 + index, doc_ids=index // T)
    return tensor, store


def test_a_tensor_and_a_store_read_alike(pair):
    tensor, store = pair
    for source in pair:
        assert isinstance(source, ActivationSource)
        assert (source.n_tokens, source.n_sources, source.d_model) == (100, 2, 8)
    for a, b in [(0, 100), (25, 75), (29, 31), (99, 100)]:  # within and across shards
        assert torch.equal(tensor.rows(a, b), store.rows(a, b))
        np.testing.assert_array_equal(tensor.token_ids(a, b), store.token_ids(a, b))
        np.testing.assert_array_equal(store.token_ids(a, b), 500 + np.arange(a, b))
    index = np.array([99, 3, 50, 31, 3])
    assert torch.equal(tensor.gather(index), store.gather(index))
    for row, before, after in [(57, 3, 1), (30, 5, 5), (39, 20, 20), (0, 2, 0)]:
        t_ids, t_rows, t_center = tensor.window(row, before, after)
        s_ids, s_rows, s_center = store.window(row, before, after)
        np.testing.assert_array_equal(t_ids, s_ids)
        np.testing.assert_array_equal(t_rows, s_rows)
        assert t_center == s_center and t_rows[t_center] == row
        assert set(t_rows // T) == {row // T}  # never crosses a context
    ids, center = store.context(57, before=3, after=1)
    np.testing.assert_array_equal(ids, [554, 555, 556, 557, 558])
    assert center == 3
    np.testing.assert_array_equal(store.positions(8, 13), [8, 9, 0, 1, 2])
    assert tensor.positions(8, 13) is None  # a tensor does not know them
    np.testing.assert_array_equal(store.records(28, 32)["context"], [2, 2, 3, 3])
    assert store.locate(57)["position"] == 7


def test_the_analysis_pass_gives_the_same_statistics_on_both(pair):
    tensor, store = pair
    cfg = CrosscoderConfig(n_sources=2, d_model=8, dict_size=32, activation="relu", k=None)
    torch.manual_seed(0)
    model = Crosscoder(cfg)
    results = []
    for source in pair:
        stats = ActivationStats(32, 2, 8, special_ids=[503, 540, 577])
        assert analysis_pass(model, source, [stats], batch_size=16, progress=False) == 100
        results.append((stats.per_latent(), stats.summary()))
    (lat_t, sum_t), (lat_s, sum_s) = results
    for key in lat_t:
        np.testing.assert_array_equal(lat_t[key], lat_s[key])
    assert sum_t == sum_s and sum_t["n_special_tokens"] == 3


def test_trainer_batches_are_the_recorded_ones():
    """The permutation rule, by hand and as recorded: the trainer's batches did not move."""
    acts = torch.from_numpy(_index_acts(50))
    source = TensorSource(acts, n_eval=10)
    order = torch.randperm(50, generator=torch.Generator().manual_seed(1234))
    train_idx = order[:40].sort().values
    perms = [train_idx[torch.randperm(40, generator=torch.Generator().manual_seed(
        3 * 1_000_003 + epoch))] for epoch in range(2)]
    stream = torch.cat(perms)
    it = source.batches(16, seed=3)
    for i in range(4):
        batch = next(it)
        assert batch.dtype == torch.float32 and batch.shape == (16, 2, 3)
        assert batch[:, 0, 0].long().tolist() == stream[16 * i: 16 * (i + 1)].tolist()
        if i == 0:
            assert batch[:, 0, 0].long().tolist() == [32, 8, 39, 40, 37, 31, 27, 9, 38, 15,
                                                      24, 48, 35, 34, 2, 47]
    assert torch.equal(next(source.batches(16, seed=3, start=3)), batch)  # resume
    assert [b[:, 0, 0].long().tolist() for b in source.eval_batches(16)] == [
        [0, 3, 7, 10, 12, 13, 14, 29, 36, 45]]
    assert source.sample(5, seed=1)[:, 0, 0].long().tolist() == [8, 46, 19, 24, 18]


def test_store_batches_are_the_recorded_ones(tmp_path):
    store = write_store(tmp_path / "s", _index_acts(100), eval_tokens=20)
    store.chunk_rows, store.window_rows = 4, 24
    assert store.n_train == 80
    it = store.batches(16, seed=3)
    assert next(it)[:, 0, 0].long().tolist() == [51, 48, 52, 75, 14, 54, 15, 34, 65, 67, 35,
                                                 64, 72, 32, 74, 55]
    assert next(store.batches(16, seed=3, start=5))[:, 0, 0].long().tolist() == [
        24, 52, 26, 69, 10, 70, 65, 68, 31, 8, 25, 53, 67, 9, 11, 30]
    assert store.sample(5, seed=1)[:, 0, 0].long().tolist() == [2, 35, 39, 58, 75]


class _Counted:
    """An iterable of batches that counts how often it is iterated."""

    def __init__(self, batches):
        self.batches, self.passes = batches, 0

    def __iter__(self):
        self.passes += 1
        return iter(self.batches)


def test_an_iterable_reads_its_batches_in_order_in_one_pass():
    acts = torch.from_numpy(_index_acts(50))
    data = _Counted([acts[i: i + 7] for i in range(0, 50, 7)])  # last batch: 1 row
    source = as_source(data)
    assert isinstance(source, IterableSource) and isinstance(source, ActivationSource)
    assert source.n_tokens is None and source.token_ids(0, 5) is None
    data.passes = 0
    got = list(ordered_batches(source, 12))
    assert [s for s, _ in got] == [0, 12, 24, 36, 48]
    assert torch.equal(torch.cat([x for _, x in got]), acts)
    assert data.passes == 1  # sequential reads continue the stream
    assert torch.equal(source.rows(45, 60), acts[45:])  # fewer rows at the end
    assert source.rows(60, 70).shape == (0, 2, 3)
    assert torch.equal(source.rows(3, 5), acts[3:5])  # an earlier start reopens it
    assert data.passes == 3


def test_what_an_iterable_cannot_do_is_a_one_line_error():
    source = as_source([torch.randn(8, 2, 3) for _ in range(3)])
    for call in (lambda: source.gather(np.array([1, 2])),
                 lambda: source.window(3, 2, 2)):
        with pytest.raises(DataError) as err:
            call()
        message = str(err.value)
        assert "\n" not in message
        assert "IterableSource" in message and "harvest it to an activation store" in message


def test_the_analysis_reads_an_iterable_like_the_tensor():
    acts = torch.randn(60, 2, 8)
    cfg = CrosscoderConfig(n_sources=2, d_model=8, dict_size=32, activation="relu", k=None)
    torch.manual_seed(0)
    model = Crosscoder(cfg)
    summaries = []
    for data in (acts, [acts[i: i + 25] for i in range(0, 60, 25)]):
        stats = ActivationStats(32, 2, 8)
        assert analysis_pass(model, data, [stats], batch_size=16, progress=False) == 60
        summaries.append(stats.summary())
    assert summaries[0] == summaries[1]


def test_a_head_limits_the_ordered_reads_only(pair):
    tensor, store = pair
    head = Head(store, 45)
    assert isinstance(head, ActivationSource) and head.n_tokens == 45
    assert torch.equal(torch.cat([x for _, x in ordered_batches(head, 20)]), store.rows(0, 45))
    np.testing.assert_array_equal(head.token_ids(40, 60), 500 + np.arange(40, 45))
    np.testing.assert_array_equal(head.window(44, 0, 3)[1], [44, 45, 46, 47])  # looks past
    assert head.describe()["head"] == 45
    with pytest.raises(DataError, match="^the first 45 rows of a source are read for the "
                                        "analysis only; train on the whole source"):
        head.batches(8, seed=0)
    unknown = Head(as_source([torch.randn(30, 2, 8)]), 45)
    assert unknown.n_tokens is None
    assert sum(len(x) for _, x in ordered_batches(unknown, 8)) == 30


def test_a_tensor_with_nan_is_refused_by_the_trainers_first_read_not_the_analysis():
    acts = torch.randn(40, 2, 3)
    acts[7, 1, 2] = float("nan")
    assert torch.isnan(as_source(acts).rows(0, 10)).any()  # the analysis checks each batch
    first_reads = [  # whichever the trainer calls first refuses, before anything is written
        lambda s: s.describe(),
        lambda s: s.sample(4, seed=0),
        lambda s: s.batches(4, seed=0),
        lambda s: s.eval_batches(4),
        lambda s: s.mean_squared_norm(),
    ]
    for read in first_reads:
        with pytest.raises(DataError, match=r"^the activation tensor holds 1 NaN or inf "
                                            r"value\(s\) in 1 of its 40 rows, the first at row 7"):
            read(as_source(acts, n_eval=8))


def test_as_source_takes_files_directories_and_sources(tmp_path, pair):
    _, store = pair
    acts = torch.randn(20, 2, 3)
    torch.save(acts, tmp_path / "acts.pt")
    from_file = as_source(tmp_path / "acts.pt", n_eval=4)
    assert isinstance(from_file, TensorSource) and torch.equal(from_file.rows(0, 20), acts)
    assert from_file.describe()["name"] == str(tmp_path / "acts.pt")
    assert isinstance(as_source(store.root), ActivationStore)
    assert as_source(store) is store
    with pytest.raises(DataError, match="^cannot read activations from a int: pass a tensor"):
        as_source(3)


@pytest.mark.parametrize("order", [["crosscoders.store", "crosscoders.data"],
                                   ["crosscoders.data", "crosscoders.store"],
                                   ["crosscoders.data.protocol"],
                                   ["crosscoders.store.reader"]])
def test_no_import_cycle(order):
    """Each order imports in a fresh interpreter; the data package alone never loads the
    store (it opens one lazily, for a directory)."""
    code, store_loaded = "import sys\n", False
    for module in order:
        code += f"import {module}\n"
        store_loaded |= module.startswith("crosscoders.store")
        if not store_loaded:
            code += "assert 'crosscoders.store' not in sys.modules\n"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(SRC), *filter(None, [os.environ.get("PYTHONPATH")])])}
    proc = subprocess.run([sys.executable, "-c", code], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
