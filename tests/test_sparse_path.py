"""The sparse TopK/BatchTopK training path agrees with the dense reference."""

import pytest
import torch

from crosscoders.model import Crosscoder, CrosscoderConfig
from crosscoders.model.sparse import batch_topk, topk_per_token
from crosscoders.train.loss import SparseStep, StepKnobs, dense_loss


def _model(activation, dtype, F=256, S=2, D=16, k=4, seed=0):
    model = Crosscoder(CrosscoderConfig(n_sources=S, d_model=D, dict_size=F,
                                        activation=activation, k=k, seed=seed)).to(dtype)
    torch.manual_seed(seed)
    with torch.no_grad():  # non-trivial biases and unequal per-source norms
        model.b_enc.normal_(0, 0.1)
        model.b_dec.normal_(0, 0.1)
        model.W_dec.mul_(torch.rand(F, S, 1, dtype=dtype) + 0.5)
    return model


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("activation", ["topk", "batchtopk"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("with_dead", [False, True])
def test_sparse_matches_dense(activation, dtype, tol, with_dead):
    torch.manual_seed(1)
    x = torch.randn(64, 2, 16, dtype=dtype)
    dead = torch.rand(256) < 0.3 if with_dead else None
    knobs = StepKnobs(k=4, auxk_coeff=1 / 32, auxk_k=8, dead_F=dead)
    results = []
    for path in ("dense", "sparse"):
        model = _model(activation, dtype)
        terms = dense_loss(model, x, knobs) if path == "dense" else SparseStep()(model, x, knobs)
        terms.total.backward()
        results.append((terms, _grads(model)))
    (td, gd), (ts, gs) = results
    assert torch.allclose(td.total, ts.total, rtol=tol, atol=0)
    assert torch.allclose(td.auxk, ts.auxk, rtol=tol, atol=tol)
    if with_dead:
        assert ts.auxk > 0
    assert torch.allclose(td.xhat_BSD, ts.xhat_BSD, rtol=tol, atol=tol)
    assert torch.equal(td.fired_F, ts.fired_F)
    assert td.l0 == ts.l0
    assert set(gd) == set(gs) == {"W_enc_FSD", "W_dec", "b_enc", "b_dec"}
    for name in gd:
        scale = gd[name].abs().max()
        assert (gd[name] - gs[name]).abs().max() <= tol * scale, name
        param = dict(_model(activation, dtype).named_parameters())[name]
        assert gs[name].stride() == param.stride()  # grads land in the parameter's layout


def test_batch_topk_exact_against_sort():
    torch.manual_seed(0)
    for B, F, n_keep in [(16, 64, 40), (32, 128, 500), (8, 96, 3), (4, 50, 30)]:
        scores = torch.randn(B, F)
        tok, lat = batch_topk(scores, n_keep)
        flat = scores.flatten()
        ref = torch.sort(flat, descending=True).indices[:n_keep]
        ref = ref[flat[ref] > 0].sort().values
        assert torch.equal(tok * F + lat, ref)
        # a hint, right or wrong, never changes the result
        for hint in (0.01, float(flat[ref].min()), 5.0):
            tok_h, lat_h = batch_topk(scores, n_keep, hint)
            assert torch.equal(tok_h * F + lat_h, ref)


def test_batch_topk_fewer_positive_than_requested():
    scores = -torch.rand(8, 64)
    scores[0, 3] = 1.0
    scores[5, 60] = 2.0
    tok, lat = batch_topk(scores, 20)
    assert tok.tolist() == [0, 5] and lat.tolist() == [3, 60]


def test_topk_per_token_sorted_and_positive():
    scores = torch.tensor([[0.1, 0.5, -1.0, 0.3], [-1.0, -2.0, 0.2, -3.0]])
    tok, lat = topk_per_token(scores, 2)
    assert tok.tolist() == [0, 0, 1] and lat.tolist() == [1, 3, 2]


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_decode_methods_agree(dtype, tol):
    """The GPU's CSR decode and the CPU's embedding_bag decode sum the same terms."""
    from crosscoders.model.sparse import SparseCodes, decode_rows

    gen = torch.Generator().manual_seed(3)
    B, F, X = 16, 64, 12
    scores = torch.randn(B, F, generator=gen, dtype=dtype)
    scores[5] = -1.0  # a token with no active latent: an empty row / bag
    token_idx, latent_idx = topk_per_token(scores, 4)
    values = torch.rand(len(token_idx), generator=gen, dtype=dtype)
    codes = SparseCodes(token_idx, latent_idx, values, B, F)
    W = torch.randn(F, X, generator=gen, dtype=dtype)
    reference = codes.to_dense() @ W
    for method in ("embedding_bag", "csr"):
        out = decode_rows(codes, values, W, method)
        assert torch.allclose(out, reference, rtol=tol, atol=tol), method
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert decode_rows(codes, values, W, "csr").dtype == dtype


@pytest.mark.parametrize("activation", ["topk", "batchtopk"])
def test_sparse_step_with_the_gpu_decode_matches_dense(activation, monkeypatch):
    import functools

    from crosscoders.model import sparse

    monkeypatch.setattr(sparse, "decode_rows",
                        functools.partial(sparse.decode_rows, method="csr"))
    torch.manual_seed(1)
    x = torch.randn(64, 2, 16)
    knobs = StepKnobs(k=4, auxk_coeff=1 / 32, auxk_k=8, dead_F=torch.rand(256) < 0.3)
    td = dense_loss(_model(activation, torch.float32), x, knobs)
    ts = SparseStep()(_model(activation, torch.float32), x, knobs)
    assert torch.allclose(td.total, ts.total, rtol=1e-5)
    assert torch.allclose(td.auxk, ts.auxk, rtol=1e-5, atol=1e-6)
    assert torch.allclose(td.xhat_BSD, ts.xhat_BSD, rtol=1e-5, atol=1e-5)
