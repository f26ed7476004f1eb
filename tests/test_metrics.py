"""The one reconstruction-metrics accumulator: against a direct float64 computation, and
every place that reports FVU / L0 reports the same numbers for the same model and data."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from crosscoders import Crosscoder, CrosscoderConfig, TrainConfig
from crosscoders.bench.layers import _fvu_and_l0
from crosscoders.bench.synthetic import _evaluate
from crosscoders.diff.stats import activation_stats
from crosscoders.metrics import ReconstructionMetrics
from crosscoders.model.sparse import SparseCodes
from crosscoders.train import Trainer
from crosscoders.train.loss import dense_loss
from helpers import planted_acts

SIZES = (1, 37, 256, 100, 7)  # batches of different sizes, one of a single token


def _reference(x_NSD, xhat_NSD, f_NF):
    """FVU per source and pooled, L0, firings per latent: straight from the definition."""
    x, xhat = x_NSD.double(), xhat_NSD.double()
    err_S = (x - xhat).pow(2).sum((0, 2))
    var_S = (x - x.mean(0)).pow(2).sum((0, 2))
    active = f_NF != 0
    return (err_S / var_S).tolist(), float(err_S.sum() / var_S.sum()), \
        float(active.sum()) / len(x), active.sum(0)


def _problem(dtype, offset=0.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    N, S, D, F = sum(SIZES), 3, 8, 40
    # sources of different scales, offset far from 0: a one-pass sum of squares minus
    # the squared sum would lose most digits in float32
    x = torch.randn(N, S, D, generator=gen) * torch.tensor([1.0, 0.01, 30.0])[:, None] + offset
    xhat = x + 0.3 * torch.randn(N, S, D, generator=gen) * x.std(0)
    f = torch.relu(torch.randn(N, F, generator=gen) - 1.0)
    f[:, :3] = 0.0  # three dead latents
    return x.to(dtype), xhat.to(dtype), f.to(dtype)


def _batches(*tensors):
    start = 0
    for n in SIZES:
        yield tuple(t[start:start + n] for t in tensors)
        start += n


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("offset", [0.0, 1e4])
@pytest.mark.parametrize("sparse", [False, True])
def test_accumulator_equals_direct_computation(dtype, offset, sparse):
    x, xhat, f = _problem(dtype, offset)
    fvu_S, fvu, l0, count_F = _reference(x, xhat, f)
    metrics = ReconstructionMetrics(x.shape[1], x.shape[2], n_latents=f.shape[1])
    for xb, xhatb, fb in _batches(x, xhat, f):
        metrics.update(xb, xhatb, SparseCodes.from_dense(fb) if sparse else fb)
    got = metrics.result()
    rel = 1e-9 if dtype == torch.float64 else 1e-5
    assert got.n_tokens == len(x)
    np.testing.assert_allclose(got.fvu_S, fvu_S, rtol=rel)
    assert got.fvu == pytest.approx(fvu, rel=rel)
    assert got.l0 == pytest.approx(l0, rel=1e-12)
    assert torch.equal(metrics.count_F, count_F)
    assert got.dead_fraction == pytest.approx(3 / f.shape[1])


def test_parts_merge_like_one_pass():
    """What data-parallel ranks do: each accumulates its batches, the packed statistics
    are gathered and merged."""
    x, xhat, f = _problem(torch.float32, offset=50.0)
    whole = ReconstructionMetrics(x.shape[1], x.shape[2], n_latents=f.shape[1])
    parts = [ReconstructionMetrics(x.shape[1], x.shape[2], n_latents=f.shape[1])
             for _ in range(2)]
    for i, (xb, xhatb, fb) in enumerate(_batches(x, xhat, f)):
        whole.update(xb, xhatb, fb)
        parts[i % 2].update(xb, xhatb, fb)
    merged = ReconstructionMetrics(x.shape[1], x.shape[2], n_latents=f.shape[1])
    for part in parts:
        merged.merge_(part.packed())
    combined, expected = merged.result(), whole.result()
    assert combined.n_tokens == expected.n_tokens and combined.l0 == expected.l0
    np.testing.assert_allclose(combined.fvu_S, expected.fvu_S, rtol=1e-12)
    assert torch.equal(merged.count_F, whole.count_F)


def test_active_count_instead_of_codes_and_constant_source():
    x = torch.randn(10, 2, 4, generator=torch.Generator().manual_seed(0))
    x[:, 1] = 3.0  # a constant source, reconstructed exactly: FVU 0, not NaN
    metrics = ReconstructionMetrics(2, 4)
    metrics.update(x[:6], x[:6], n_active=12)
    metrics.update(x[6:], x[6:], n_active=8)
    got = metrics.result()
    assert got.fvu_S == [0.0, 0.0] and got.l0 == 2.0 and got.dead_fraction is None
    assert np.isnan(ReconstructionMetrics(2, 4).result().fvu)


class _Rows:
    """A source whose held-out split is the given rows, in batches."""

    def __init__(self, x_NSD):
        self.x = x_NSD
        _, self.n_sources, self.d_model = x_NSD.shape

    def eval_batches(self, batch_size):
        for start in range(0, len(self.x), batch_size):
            yield self.x[start:start + batch_size]

    def describe(self):
        return {"kind": "tensor", "n_tokens": len(self.x)}


def test_every_reporter_gives_the_same_fvu_and_l0():
    """Trainer log and eval records, the diff's activation statistics and both benchmarks
    measure one model on one tensor: the same FVU per source, pooled FVU and L0."""
    x, _ = planted_acts(n=700, D=16, seed=3)
    cfg = CrosscoderConfig(n_sources=2, d_model=16, dict_size=64, activation="topk", k=4,
                           source_names=["a", "b"])
    model = Crosscoder(cfg)
    with torch.no_grad():
        model.b_dec.copy_(x.mean(0) * 0.5)
    with torch.no_grad():
        f = model.eval().encode(x)
        fvu_S, fvu, l0, _ = _reference(x, model.decode(f), f)

    trainer = Trainer(model, _Rows(x), TrainConfig(batch_size=256, progress=False))
    trainer.scale_S = torch.ones(2)  # work in the data's own units
    evaluated = trainer.evaluate()  # three batches: 256, 256, 188
    with torch.no_grad():
        terms = dense_loss(trainer.model, x, trainer.knobs_at(0))  # TopK: as at inference
    logged = trainer._log_record(x, terms)
    _, summary = activation_stats(model, x, batch_size=97, progress=False)
    synthetic_fvu_S, synthetic_l0, _ = _evaluate(model, x, batch=300)
    layers_fvu, layers_l0 = _fvu_and_l0([model], x)

    for got in ([evaluated["fvu/a"], evaluated["fvu/b"]],
                [logged["fvu/a"], logged["fvu/b"]], summary["fvu"], synthetic_fvu_S):
        np.testing.assert_allclose(got, fvu_S, rtol=1e-5)
    assert layers_fvu == pytest.approx(fvu, rel=1e-5)
    for got in (evaluated["l0"], logged["l0"], summary["l0"], synthetic_l0, layers_l0):
        assert got == pytest.approx(l0, rel=1e-12)
