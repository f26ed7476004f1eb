"""The bf16-screened selection finds exactly what an fp32 selection finds; `auto` uses it
where it is accurate and measured to pay."""

import pytest
import torch

from crosscoders import TrainConfig
from crosscoders.data import as_source
from crosscoders.model import Crosscoder, CrosscoderConfig
from crosscoders.model.screen import (
    SCREEN_BLOCK,
    _bf16_scores,
    error_constants,
    screened_batch_topk,
    screened_topk_per_token,
)
from crosscoders.model.sparse import batch_topk, topk_per_token
from crosscoders.model.workspace import Workspace
from crosscoders.train import Trainer
from crosscoders.train.loss import SparseStep, StepKnobs, dense_loss
from helpers import planted_acts


def _problem(B=96, F=512, X=48, seed=0, bias=0.3, spread=True):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, X, generator=gen)
    if spread:  # token norms over two orders of magnitude, as in real residual streams
        x *= torch.exp(torch.randn(B, 1, generator=gen))
    W = torch.randn(F, X, generator=gen) / X**0.5
    W *= torch.rand(F, 1, generator=gen) + 0.2
    b = torch.randn(F, generator=gen) * bias
    w = torch.rand(F, generator=gen) * 1.5 + 0.1
    return x, W, b, w


def _entries(found):
    """(token, latent, pre-activation, score) of a screened selection's result."""
    codes, score_E = found
    return codes.token_E, codes.latent_E, codes.value_E, score_E


def _fp32_reference(x, W, b, w, n_keep):
    pre = torch.addmm(b, x, W.T)
    scores = torch.relu(pre) * w
    tok, lat = batch_topk(scores, n_keep)
    return tok, lat, pre[tok, lat], scores[tok, lat]


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("k", [1, 4, 32])
def test_screened_selection_equals_fp32_selection(seed, k):
    x, W, b, w = _problem(seed=seed)
    n_keep = k * x.shape[0]
    ref_tok, ref_lat, ref_pre, ref_score = _fp32_reference(x, W, b, w, n_keep)
    cut = float(ref_score.min())
    # no hint, a good hint, a hint above the cut (must fall back) and a very low one
    for hint in (None, 0.99 * cut, 1.5 * cut, 1e-3 * cut):
        tok, lat, pre, score = _entries(
            screened_batch_topk(x, W, b, w, n_keep, hint, Workspace()))
        assert torch.equal(tok, ref_tok) and torch.equal(lat, ref_lat), hint
        torch.testing.assert_close(pre, ref_pre, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(score, ref_score, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("k", [1, 5, 8, 40])  # 40 > blocks per token: no useful cut
def test_screened_per_token_topk_equals_fp32(seed, k):
    x, W, b, w = _problem(seed=seed)
    b -= 2.0
    x[:8] = 0.0  # these tokens have only negative pre-activations
    pre = torch.addmm(b, x, W.T)
    tok_ref, lat_ref = topk_per_token(torch.relu(pre) * w, k)
    assert k == 1 or torch.bincount(tok_ref, minlength=len(x)).min() < k
    tok, lat, pre_E, _ = _entries(screened_topk_per_token(x, W, b, w, k, Workspace()))
    assert torch.equal(tok, tok_ref) and torch.equal(lat, lat_ref)
    torch.testing.assert_close(pre_E, pre[tok_ref, lat_ref], rtol=1e-5, atol=1e-5)


def test_screened_selection_with_few_positive_entries():
    x, W, b, w = _problem(bias=0.0)
    b -= 4.0 * torch.linalg.vector_norm(W, dim=1) * 3  # almost every pre-activation < 0
    b[7] = 50.0  # one latent on for every token
    ref_tok, ref_lat, _, _ = _fp32_reference(x, W, b, w, 10 * x.shape[0])
    assert 0 < ref_tok.numel() < 10 * x.shape[0]
    tok, lat, _, _ = _entries(screened_batch_topk(x, W, b, w, 10 * x.shape[0]))
    assert torch.equal(tok, ref_tok) and torch.equal(lat, ref_lat)


def test_screened_selection_reuses_workspace_across_shapes():
    workspace = Workspace()
    for B, F in [(64, 256), (96, 512), (64, 256)]:
        x, W, b, w = _problem(B=B, F=F)
        ref_tok, ref_lat, _, _ = _fp32_reference(x, W, b, w, 8 * B)
        tok, lat, _, _ = _entries(screened_batch_topk(x, W, b, w, 8 * B, None, workspace))
        assert torch.equal(tok, ref_tok) and torch.equal(lat, ref_lat)


@pytest.mark.parametrize("X", [16, 512, 2048])
def test_error_bound_holds(X):
    """|bf16 estimate - exact| stays within the bound the selection relies on."""
    x, W, b, w = _problem(B=64, F=256, X=X)
    W[:, : X // 4] *= 100.0  # mixed magnitudes within a row stress the rounding
    x[:, : X // 8] *= 30.0
    est = _bf16_scores(x, W, b, w, Workspace()).float()
    exact = ((x.double() @ W.double().T) + b.double()) * w.double()
    c1, u_out = error_constants(X + 1)
    n = torch.sqrt((x.double() ** 2).sum(1) + 1)
    m = w.double() * torch.sqrt((W.double() ** 2).sum(1) + b.double() ** 2)
    bound = c1 * n[:, None] * m[None, :] + u_out * est.double().abs()
    err = (est.double() - exact).abs()
    assert bool((err <= bound).all())
    assert float((err / bound).max()) > 1e-3  # the bound is not vacuous


def _model(F=256, S=2, D=16, k=4, activation="batchtopk"):
    model = Crosscoder(CrosscoderConfig(n_sources=S, d_model=D, dict_size=F,
                                        activation=activation, k=k))
    torch.manual_seed(0)
    with torch.no_grad():
        model.b_enc.normal_(0, 0.1)
        model.W_dec.mul_(torch.rand(F, S, 1) + 0.5)
    return model


@pytest.mark.parametrize("activation", ["topk", "batchtopk"])
@pytest.mark.parametrize("with_dead", [False, True])
def test_screened_step_matches_dense_reference(activation, with_dead):
    assert 256 % SCREEN_BLOCK == 0
    torch.manual_seed(1)
    x = torch.randn(64, 2, 16)
    dead = torch.rand(256) < 0.3 if with_dead else None
    knobs = StepKnobs(k=4, auxk_coeff=1 / 32, auxk_k=8, dead_F=dead)
    out = []
    for step in (dense_loss, SparseStep(screen=True)):
        model = _model(activation=activation)
        terms = step(model, x, knobs)
        terms.total.backward()
        out.append((terms, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (td, gd), (ts, gs) = out
    torch.testing.assert_close(ts.total, td.total, rtol=1e-5, atol=0)
    torch.testing.assert_close(ts.auxk, td.auxk, rtol=1e-5, atol=1e-6)
    assert torch.equal(td.fired_F, ts.fired_F) and td.l0 == ts.l0
    if activation == "batchtopk":
        assert ts.min_kept_score == pytest.approx(td.min_kept_score, rel=1e-5)
    for name in gd:
        scale = gd[name].abs().max()
        assert (gd[name] - gs[name]).abs().max() <= 1e-5 * scale, name


def _inference_model(activation, F=512, D=16):
    model = Crosscoder(CrosscoderConfig(n_sources=2, d_model=D, dict_size=F,
                                        activation=activation, k=6)).eval()
    with torch.no_grad():
        model.b_enc.normal_(0, 0.1)
        model.W_dec.mul_(torch.rand(F, 2, 1, generator=torch.Generator().manual_seed(2)) + 0.5)
    return model


def _calibrate(model, x):
    with torch.no_grad():
        scores = torch.relu(model.preactivations(x)) * model.decoder_norm_weights()
        top = scores.flatten().topk(6 * len(x) + 1).values
        # between two scores: a threshold equal to one would make that entry a coin toss
        model.activation.threshold.fill_(float(top[-2] + top[-1]) / 2)
        model.activation.threshold_updates.fill_(1)


@pytest.mark.parametrize("activation", ["topk", "batchtopk"])
def test_screened_inference_equals_fp32_inference(activation):
    import copy
    import pickle

    x = torch.randn(600, 2, 16, generator=torch.Generator().manual_seed(5))
    model = _inference_model(activation)
    if activation == "batchtopk":
        _calibrate(model, x)
    with torch.no_grad():
        model.screen_inference = False
        ref = model.encode(x)
        model.screen_inference = True
        got = model.encode(x)
        codes = model.encode_sparse(x)
    tok, lat, val = codes.token_E, codes.latent_E, codes.value_E
    assert model._screen_workspace.names()  # the screened path ran
    assert torch.equal(ref != 0, got != 0) and 0 < (got != 0).float().mean() < 0.1
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    order = tok * 512 + lat
    assert torch.equal(order, order.sort().values)
    torch.testing.assert_close(val, ref[tok, lat])
    # weights changed in place: the cached bf16 weights must not be reused
    with torch.no_grad():
        model.W_enc_FSD[:100].mul_(-1.5)
        model.screen_inference = False
        ref2 = model.encode(x)
        model.screen_inference = True
        got2 = model.encode(x)
    assert not torch.equal(ref2 != 0, ref != 0)
    assert torch.equal(ref2 != 0, got2 != 0)
    torch.testing.assert_close(got2, ref2, rtol=1e-5, atol=1e-5)
    # with autograd on, encode stays differentiable (the fp32 path)
    assert model.encode(x).requires_grad
    # copies and pickles do not carry the buffers
    assert copy.deepcopy(model)._screen_workspace.names() == []
    assert pickle.loads(pickle.dumps(model))._screen_workspace.names() == []


def test_screened_inference_is_thread_safe():
    from concurrent.futures import ThreadPoolExecutor

    model = _inference_model("topk")
    gen = torch.Generator().manual_seed(9)
    xs = [torch.randn(400 + 50 * i, 2, 16, generator=gen) for i in range(6)]
    with torch.no_grad():
        model.screen_inference = False
        refs = [model.encode(x) for x in xs]
        model.screen_inference = True

        def run(x):
            with torch.no_grad():
                return model.encode(x)

        with ThreadPoolExecutor(4) as pool:
            got = list(pool.map(run, xs * 3))
    for i, g in enumerate(got):
        torch.testing.assert_close(g, refs[i % len(xs)], rtol=1e-5, atol=1e-5)


def test_probe_rejects_a_gemm_that_accumulates_in_bf16(monkeypatch):
    from crosscoders.model import screen

    assert screen.bf16_gemm_meets_bound.__wrapped__()  # this build's GEMM passes
    real_mm = torch.mm

    def bf16_accumulating_mm(a, b, out=None):
        acc = torch.zeros(a.shape[0], b.shape[1], dtype=torch.bfloat16)
        for start in range(0, a.shape[1], 32):  # running sum rounded to bf16 per chunk
            part = real_mm(a[:, start:start + 32].float(), b[start:start + 32].float())
            acc = (acc.float() + part).bfloat16()
        return out.copy_(acc) if out is not None else acc

    monkeypatch.setattr(torch, "mm", bf16_accumulating_mm)
    assert not screen.bf16_gemm_meets_bound.__wrapped__()


# ----------------------------------------------------------------- the auto decision


@pytest.fixture
def decide(monkeypatch):
    """Set what the probes report: ``decide(bf16_ms, fp32_ms, accurate=True)``; returns
    the list of timing calls. The real decision cache is restored afterwards."""
    from crosscoders.model import screen

    saved = dict(screen._decisions)
    screen._decisions.clear()
    timings = []

    def set_probes(bf16_ms: float, fp32_ms: float, accurate: bool = True) -> list:
        def fake_timing():
            timings.append(torch.get_num_threads())
            return bf16_ms, fp32_ms

        monkeypatch.setattr(screen, "measure_gemm_ms", fake_timing)
        monkeypatch.setattr(screen, "bf16_gemm_meets_bound", lambda: accurate)
        return timings

    yield set_probes
    screen._decisions.clear()
    screen._decisions.update(saved)


def _trainer(screen: str = "auto", run_dir=None):
    tc = TrainConfig(steps=4, batch_size=256, progress=False, eval_tokens=0, screen=screen)
    model = Crosscoder(CrosscoderConfig(n_sources=2, d_model=16, dict_size=128, k=4))
    return Trainer(model, as_source(planted_acts(n=1024)[0], 0, 256), tc, run_dir)


def test_timing_probe_runs_once_per_process_and_thread_count(decide):
    from crosscoders.model.screen import bf16_screen_available, screen_decision

    timings = decide(10.0, 40.0)
    cpu = torch.device("cpu")
    first = screen_decision(cpu)
    assert first.available and first.ratio == 0.25
    assert (first.t_bf16_ms, first.t_fp32_ms) == (10.0, 40.0)
    assert "0.25" in first.reason
    assert bf16_screen_available(cpu) and _trainer().sparse_step.screen
    assert screen_decision(cpu) is first
    assert len(timings) == 1
    threads = torch.get_num_threads()
    other = 1 if threads > 1 else 2
    try:
        torch.set_num_threads(other)
        screen_decision(cpu)
        screen_decision(cpu)
    finally:
        torch.set_num_threads(threads)
    assert timings == [threads, other]  # the other thread count is measured once, too
    assert screen_decision(cpu) is first


def test_slow_bf16_gemm_turns_auto_off(decide):
    from crosscoders.model.screen import MAX_BF16_TIME_RATIO, screen_decision

    decide(MAX_BF16_TIME_RATIO * 40.0 * 1.05, 40.0)
    decision = screen_decision(torch.device("cpu"))
    assert not decision.available and decision.ratio > MAX_BF16_TIME_RATIO
    assert not _trainer().sparse_step.screen
    model = _inference_model("topk")
    with torch.no_grad():
        model.encode(torch.randn(600, 2, 16))
    assert model._screen_workspace.names() == []  # the fp32 GEMM ran


def test_fast_bf16_gemm_turns_auto_on(decide):
    from crosscoders.model.screen import MAX_BF16_TIME_RATIO, screen_decision

    decide(MAX_BF16_TIME_RATIO * 40.0 * 0.95, 40.0)
    assert screen_decision(torch.device("cpu")).available
    assert _trainer().sparse_step.screen
    model = _inference_model("topk")
    with torch.no_grad():
        model.encode(torch.randn(600, 2, 16))
    assert model._screen_workspace.names()  # the screened path ran


def test_inaccurate_bf16_gemm_turns_auto_off_however_fast(decide):
    from crosscoders.model.screen import screen_decision

    timings = decide(1.0, 100.0, accurate=False)
    decision = screen_decision(torch.device("cpu"))
    assert not decision.available and "accuracy probe" in decision.reason
    assert not _trainer().sparse_step.screen
    assert timings == []  # an inaccurate GEMM is never used, so never timed


def test_screen_on_and_off_override_the_measurement(decide):
    timings = decide(1.0, 100.0)  # would be on
    assert not _trainer("off").sparse_step.screen
    decide(100.0, 1.0)  # would be off
    assert _trainer("on").sparse_step.screen
    assert timings == []  # neither setting needs the probes
    model = _inference_model("topk")
    model.screen_inference = True
    with torch.no_grad():
        model.encode(torch.randn(600, 2, 16))
    assert model._screen_workspace.names() and timings == []


def test_auto_stays_off_on_cuda_without_measuring(decide):
    from crosscoders.model.screen import screen_decision

    timings = decide(1.0, 100.0)
    decision = screen_decision(torch.device("cuda"))
    assert not decision.available and "cuda" in decision.reason
    assert timings == []


def test_decision_is_not_part_of_the_run_identity(decide, tmp_path):
    from crosscoders.model import screen

    decide(1.0, 100.0)
    first = _trainer(run_dir=tmp_path)
    assert first.sparse_step.screen
    first.run()
    run_json = (tmp_path / "run.json").read_text()

    screen._decisions.clear()
    decide(100.0, 1.0)  # another machine, say: auto now decides off
    again = _trainer(run_dir=tmp_path)
    assert not again.sparse_step.screen
    again.run()  # resuming is not refused
    assert again.step == 4
    assert (tmp_path / "run.json").read_text() == run_json


def test_gemm_timing_measures_both_gemms():
    from crosscoders.model.screen import measure_gemm_ms

    state = torch.get_rng_state()
    t_bf16, t_fp32 = measure_gemm_ms()
    assert 0 < t_bf16 < 1e4 and 0 < t_fp32 < 1e4
    assert torch.equal(torch.get_rng_state(), state)  # training's RNG stream is untouched
