"""Exact TopK / BatchTopK selection screened by a bf16 GEMM.

The fp32 encoder GEMM ``x @ W_enc`` is the most expensive part of a TopK training step,
yet only ``n_keep = k * B`` of its ``B * F`` outputs survive. This module finds exactly
the same ``n_keep`` entries as an fp32 GEMM would, computing the full product only in
bf16 (4-8x faster on CPUs with bf16 hardware) and recomputing the few candidates in fp32:

1. ``s~ = bf16(x) @ bf16(W * w)`` with the bias as an extra column, so ``s~`` estimates the
   norm-weighted pre-activation ``s = w_i * (x . W_i + b_i)`` of every entry.
2. A rigorous bound on the rounding error: ``|s~ - s| <= c1 * n_b * m_i + u' * |s~|``,
   with ``n_b = ||(x_b, 1)||``, ``m_i = w_i * ||(W_i, b_i)||`` (Cauchy-Schwarz bounds the
   sum of absolute products) and ``c1`` covering input rounding (2 ulps of bf16), fp32
   accumulation and the fp32 recomputation (see :func:`error_constants`).
3. Blocks of 64 latents of one token get an upper and a lower bound from their largest
   ``s~``. A cut ``c`` below the true ``n_keep``-th largest score follows from the lower
   bounds (or from the previous step's cut, verified afterwards); every entry whose upper
   bound reaches ``c`` is a candidate.
4. Candidates are recomputed in fp32 (one sampled dot product each) and the ``n_keep``
   largest kept. No entry outside the candidates can beat ``c``, so the result equals the
   selection on fp32 scores (up to fp32 rounding, exactly as the fp32 paths differ).

Per-token TopK (:func:`screened_topk_per_token`) is the same with one cut per token: first
its k-th largest block estimate, verified after recomputation, else the proven bound.

The bound assumes fp32 accumulation in the bf16 GEMM: oneDNN does so on CPU, and on CUDA
reduced-precision reductions are switched off around the GEMM.
:func:`screen_decision` (the ``auto`` setting) decides per process, on CPU only: this
build's bf16 GEMM must pass the accuracy probe and, timed once, take at most
:data:`MAX_BF16_TIME_RATIO` of the fp32 GEMM's time.
"""

from __future__ import annotations

import functools
import math
import threading
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from crosscoders.model.sparse import SparseCodes, sampled_dot
from crosscoders.model.workspace import NO_REUSE, Workspace

SCREEN_BLOCK = 64  # latents per block (int16 block maxima vectorise well at 64)
_U_BF16 = 2.0 ** -8  # unit roundoff of bf16 (round to nearest)
_U_FP32 = 2.0 ** -24
_CHUNK = 1024  # encoder rows scaled and converted per chunk (stays in cache)


#: ``auto`` screens where the bf16 GEMM takes at most this fraction of the fp32 GEMM's time.
#: Break-even is 0.72-0.91 on the measured CPUs (docs/training.md); the margin covers the
#: probe's shape and noise.
MAX_BF16_TIME_RATIO = 0.6
_PROBE_SHAPE = (512, 1024, 4096)  # (B, X, F) of the timed GEMMs: ~4 GFLOP each
_PROBE_REPEATS = 3


@dataclass(frozen=True)
class ScreenDecision:
    """What ``screen="auto"`` decided for a device, and why (see :func:`screen_decision`)."""

    available: bool
    reason: str
    t_bf16_ms: float | None = None  # fastest of the timed bf16 GEMMs
    t_fp32_ms: float | None = None
    #: bf16 features the CPU reports (information only: the decision is measured)
    cpu_features: tuple[str, ...] = ()

    @property
    def ratio(self) -> float | None:
        """bf16 over fp32 GEMM time (None where not measured)."""
        if self.t_bf16_ms is None or self.t_fp32_ms is None:
            return None
        return self.t_bf16_ms / self.t_fp32_ms


def bf16_screen_available(device: torch.device) -> bool:
    """Does ``auto`` screen on ``device``? (:func:`screen_decision`'s verdict.)"""
    return screen_decision(device).available


_decisions: dict[int, ScreenDecision] = {}
_decisions_lock = threading.Lock()


def screen_decision(device: torch.device) -> ScreenDecision:
    """Whether screening pays on ``device``, decided once per process and thread count.

    CPU only (CUDA stays off until it has been measured there): this build's bf16 GEMM
    must stay within the error bound (:func:`bf16_gemm_meets_bound`) and take at most
    :data:`MAX_BF16_TIME_RATIO` of the fp32 GEMM's time (:func:`measure_gemm_ms`).
    """
    if device.type != "cpu":
        return ScreenDecision(False, f"auto does not screen on {device.type}: not measured "
                                     "there yet (screen='on' forces it)")
    threads = torch.get_num_threads()
    with _decisions_lock:  # one measurement per key, never two at once
        if threads not in _decisions:
            _decisions[threads] = _decide_cpu()
        return _decisions[threads]


def _decide_cpu() -> ScreenDecision:
    features = _cpu_bf16_features()
    # a caller's autocast would turn the fp32 GEMM into a bf16 one
    with torch.no_grad(), torch.autocast("cpu", enabled=False):
        if not bf16_gemm_meets_bound():
            return ScreenDecision(False, "this build's bf16 GEMM fails the accuracy probe",
                                  cpu_features=features)
        t_bf16, t_fp32 = measure_gemm_ms()
    pays = t_bf16 <= MAX_BF16_TIME_RATIO * t_fp32
    verdict = "<=" if pays else ">"
    reason = (f"bf16 GEMM {t_bf16:.1f} ms / fp32 {t_fp32:.1f} ms = {t_bf16 / t_fp32:.2f} "
              f"{verdict} {MAX_BF16_TIME_RATIO}")
    return ScreenDecision(pays, reason, t_bf16, t_fp32, features)


def measure_gemm_ms() -> tuple[float, float]:
    """(bf16, fp32) milliseconds of the screen's GEMM and the fp32 selection's GEMM at
    :data:`_PROBE_SHAPE`, with the current thread count and no autocast: the fastest of a
    few interleaved repeats after a warm-up (interleaved, so that load from elsewhere hits
    both)."""
    B, X, F_ = _PROBE_SHAPE
    gen = torch.Generator().manual_seed(0)  # leaves the global RNG alone
    # uniform: cheaper to draw than normal, and the values do not change the speed
    x_BX, W_FX, b_F = (torch.empty(shape).uniform_(-1, 1, generator=gen)
                       for shape in ((B, X), (F_, X), (F_,)))
    out_BF = torch.empty(B, F_)
    X_pad = _padded_inner(X)
    x_bf = torch.zeros(B, X_pad, dtype=torch.bfloat16)
    W_bf = torch.zeros(F_, X_pad, dtype=torch.bfloat16)
    x_bf[:, :X], W_bf[:, :X] = x_BX, W_FX
    out_bf = torch.empty(B, F_, dtype=torch.bfloat16)
    runs = {"bf16": lambda: torch.mm(x_bf, W_bf.T, out=out_bf),
            "fp32": lambda: torch.addmm(b_F, x_BX, W_FX.T, out=out_BF)}
    best = dict.fromkeys(runs, math.inf)
    for run in runs.values():
        run()  # warm-up: packing buffers, lazy kernel selection
    for _ in range(_PROBE_REPEATS):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - start)
    return best["bf16"] * 1000, best["fp32"] * 1000


def _cpu_bf16_features() -> tuple[str, ...]:
    """The CPU's bf16 hardware as torch reports it (AMX tiles, AVX-512 bf16)."""
    probes = (("amx", "_is_amx_tile_supported"), ("avx512_bf16", "_is_avx512_bf16_supported"))
    found = []
    for name, probe in probes:
        try:
            if getattr(torch.cpu, probe)():
                found.append(name)
        except (AttributeError, RuntimeError):  # a torch without the probe
            pass
    return tuple(found)


@functools.cache
def bf16_gemm_meets_bound() -> bool:
    """Does this build's CPU bf16 GEMM stay within :func:`error_constants`' bound?

    A probe against fp64 on random data with mixed magnitudes, plus adversarial dot
    products ``v . v`` where one large term is followed by small ones summing, per
    accumulation chunk of 1 to 128 terms, to under half a bf16 spacing of the large term:
    a GEMM that rounds its running sums to bf16 loses all of them, far beyond the bound.
    """
    gen = torch.Generator().manual_seed(0)
    x_BX = torch.randn(64, 1024, generator=gen) * torch.exp(torch.randn(1, 1024, generator=gen))
    W_FX = torch.randn(256, 1024, generator=gen) * torch.exp(torch.randn(1, 1024, generator=gen))
    b_F, w_F = torch.randn(256, generator=gen), torch.rand(256, generator=gen) + 0.5
    for row, chunk in enumerate((1, 4, 16, 32, 64, 128)):
        v = torch.full((1024,), math.sqrt(0.45 * 16 / chunk))  # 4096 has bf16 spacing 32
        v[0] = 64.0
        x_BX[row], W_FX[row], b_F[row], w_F[row] = v, v, 0.0, 1.0
    est = _bf16_scores(x_BX, W_FX, b_F, w_F, NO_REUSE).double()
    exact = (x_BX.double() @ W_FX.double().T + b_F.double()) * w_F.double()
    c1, u_out = error_constants(1025)
    n_B, m_F = bound_norms(x_BX.double(), W_FX.double(), b_F.double(), w_F.double())
    bound = c1 * n_B[:, None] * m_F[None, :] + u_out * est.abs()
    return bool(((est - exact).abs() <= bound).all())


def error_constants(n_terms: int) -> tuple[float, float]:
    """(c1, u'): ``|s~ - s| <= c1 * n_b * m_i + u' * |s~|`` for dot products of n_terms.

    c1: rounding of both inputs to bf16 (``2u + u^2``), the scaled encoder's fp32 product
    before it (``2^-23``), fp32 accumulation in the GEMM and in the fp32 recomputation
    (``gamma_n`` each); u': rounding of the GEMM output to bf16. A 5% margin covers the
    fp32 norms used in the bound.
    """
    gamma = n_terms * _U_FP32 / (1 - n_terms * _U_FP32)
    u = _U_BF16
    c1 = (2 * u + u * u + 2 * _U_FP32) + gamma * (1 + u) ** 2 + (gamma + 2 * _U_FP32)
    u_out = u / (1 - u) + 4 * _U_FP32
    return 1.05 * c1, 1.05 * u_out


def bound_norms(x_BX: Tensor | None, W_FX: Tensor | None = None, b_F: Tensor | None = None,
                w_F: Tensor | None = None) -> tuple[Tensor | None, Tensor | None]:
    """The bound's norms: ``n_b = ||(x_b, 1)||`` and ``m_i = w_i ||(W_i, b_i)||`` (each
    None when its inputs are not given)."""
    n_B = None if x_BX is None else torch.sqrt(
        torch.linalg.vector_norm(x_BX, dim=1).pow(2) + 1.0)
    m_F = None if W_FX is None else w_F * torch.sqrt(
        torch.linalg.vector_norm(W_FX, dim=1).pow(2) + b_F.pow(2))
    return n_B, m_F


class _Screen:
    """The bf16 estimate of one batch's scores with its error bounds, block by block."""

    def __init__(self, x_BX: Tensor, W_FX: Tensor, b_F: Tensor, w_F: Tensor,
                 workspace: Workspace, weights_key: tuple | None = None):
        self.x_BX, self.W_FX, self.b_F, self.w_F = x_BX, W_FX, b_F, w_F
        self.workspace = workspace
        B, X = x_BX.shape
        self.G = W_FX.shape[0] // SCREEN_BLOCK  # blocks per token
        scores_i16 = _bf16_scores(x_BX, W_FX, b_F, w_F, workspace, weights_key)
        scores_i16 = scores_i16.view(torch.int16)
        self.blocks_TK = scores_i16.view(-1, SCREEN_BLOCK)
        c1, self.u_out = error_constants(X + 1)
        n_B = bound_norms(x_BX)[0]
        m_F = workspace.cached("screen_m", weights_key,
                               lambda: bound_norms(None, W_FX, b_F, w_F)[1])
        # |s~ - s| <= slack + u' |s~| for every entry of a block (largest m_i of the block)
        self.slack_BG = (c1 * n_B)[:, None] * m_F.view(self.G, SCREEN_BLOCK).amax(1)[None, :]
        # positive bf16 values order like their int16 bit patterns; negatives sort below
        self.block_max_T = torch.amax(self.blocks_TK, dim=1)
        block_max = self.block_max_T.view(torch.bfloat16).float().clamp_min_(0.0)
        self.block_max_BG = block_max.view(B, self.G)

    def lower_bounds(self) -> Tensor:
        """[B, G] lower bound of the true score of each block's largest estimate."""
        return self.block_max_BG * (1 - self.u_out) - self.slack_BG

    def candidates(self, cut: float | Tensor) -> tuple[SparseCodes, Tensor]:
        """Every entry whose score may reach ``cut`` (a number, or [B, 1] per token), with
        its exact fp32 pre-activation as value, and its score."""
        x_BX, W_FX, b_F, w_F = self.x_BX, self.W_FX, self.b_F, self.w_F
        B, F_, G = x_BX.shape[0], W_FX.shape[0], self.G
        # an entry can reach the cut only if s~ >= (cut - slack) / (1 + u'): one int16
        # threshold per block, rounded down to bf16; blocks whose threshold is not
        # positive keep every entry
        thr_T = ((cut - self.slack_BG) / (1 + self.u_out)).view(-1)
        thr_i16_T = (thr_T * (1 - 2 * _U_BF16)).to(torch.bfloat16).view(torch.int16)
        thr_i16_T = torch.where(thr_T > 0, thr_i16_T, torch.iinfo(torch.int16).min)
        block_ids = torch.nonzero(self.block_max_T >= thr_i16_T).squeeze(1)
        shape = (block_ids.numel(), SCREEN_BLOCK)
        # reused buffers: fresh 10s-of-MB tensors cost more in page faults than the work
        cand_GK = self.workspace.get("screen_cand", shape, self.blocks_TK.dtype, x_BX.device)
        torch.index_select(self.blocks_TK, 0, block_ids, out=cand_GK)
        above_GK = self.workspace.get("screen_above", shape, torch.bool, x_BX.device)
        torch.ge(cand_GK, thr_i16_T[block_ids, None], out=above_GK)
        flat_E = _flat_nonzero(above_GK)
        ids_E = block_ids[flat_E // SCREEN_BLOCK]
        token_E = ids_E // G
        latent_E = (ids_E % G) * SCREEN_BLOCK + flat_E % SCREEN_BLOCK
        codes = SparseCodes(token_E, latent_E, x_BX.new_empty(0), B, F_)
        pre_E = sampled_dot(x_BX, W_FX, codes) + b_F[latent_E]
        return codes.with_values(pre_E), torch.relu(pre_E) * w_F[latent_E]


def screened_batch_topk(
    x_BX: Tensor, W_FX: Tensor, b_F: Tensor, w_F: Tensor, n_keep: int,
    hint: float | None = None, workspace: Workspace = NO_REUSE,
) -> tuple[SparseCodes, Tensor]:
    """The ``n_keep`` largest positive ``w_i * relu(x_b . W_i + b_i)``, found exactly.

    Returns the kept entries with their fp32 pre-activations as values, and their
    weighted scores [E]. ``hint`` (the last step's cut) only changes the speed.
    ``workspace`` holds reusable buffers.
    """
    screen = _Screen(x_BX, W_FX, b_F, w_F, workspace)
    tiny = torch.finfo(x_BX.dtype).tiny

    def select(cut: float, verify: bool) -> tuple[SparseCodes, Tensor] | None:
        codes, score_E = screen.candidates(cut)
        if verify and int((score_E >= cut).sum()) < n_keep:
            return None  # the hint was above the n_keep-th score
        positive = score_E > 0
        if int(positive.sum()) > n_keep:
            keep = torch.topk(score_E, n_keep, sorted=False).indices.sort().values
        else:
            keep = torch.nonzero(positive).squeeze(1)
        return codes.take(keep), score_E[keep]

    if hint is not None and hint > tiny:
        for cut in (hint, 0.95 * hint):  # a second, lower try is cheaper than the bounds
            found = select(cut, verify=True)
            if found is not None:
                return found
    # lower bound of each block's largest entry: n_keep distinct entries reach the cut
    lower_T = screen.lower_bounds().view(-1)
    cut = tiny
    if n_keep <= lower_T.numel():
        cut = max(float(torch.topk(lower_T, n_keep, sorted=False).values.min()), tiny)
    return select(cut, verify=False)


def screened_topk_per_token(
    x_BX: Tensor, W_FX: Tensor, b_F: Tensor, w_F: Tensor, k: int,
    workspace: Workspace = NO_REUSE, weights_key: tuple | None = None,
) -> tuple[SparseCodes, Tensor]:
    """The k largest positive scores of every token, found exactly (as above)."""
    screen = _Screen(x_BX, W_FX, b_F, w_F, workspace, weights_key)
    B, F_ = x_BX.shape[0], W_FX.shape[0]
    tiny = torch.finfo(x_BX.dtype).tiny
    lower_BG = screen.lower_bounds()
    if k > lower_BG.shape[1]:  # more than one entry per block: no cheap cut
        codes, score_E = screen.candidates(lower_BG.new_full((B, 1), tiny))
        keep = _topk_within_tokens(codes.token_E, score_E, k, B)
        return codes.take(keep), score_E[keep]
    # first try each token's k-th largest block estimate (usually below its k-th score);
    # tokens where fewer than k candidates reach it are redone with the proven cut
    guess_B = torch.topk(screen.block_max_BG, k, dim=1, sorted=False).values.amin(1)
    guess_B = guess_B.mul_(1 - screen.u_out).clamp_min_(tiny)
    codes, score_E = screen.candidates(guess_B[:, None])
    token_E = codes.token_E
    reached_B = torch.bincount(token_E[score_E >= guess_B[token_E]], minlength=B)
    redo_B = reached_B < k
    if bool(redo_B.any()):
        proven_B = torch.topk(lower_BG, k, dim=1, sorted=False).values.amin(1).clamp_min(tiny)
        cut_B = torch.where(redo_B, proven_B, torch.inf)
        again, again_score_E = screen.candidates(cut_B[:, None])
        kept = ~redo_B[token_E]
        token_E, latent_E, pre_E, score_E = (torch.cat([a[kept], b]) for a, b in zip(
            (token_E, codes.latent_E, codes.value_E, score_E),
            (again.token_E, again.latent_E, again.value_E, again_score_E)))
        order = torch.argsort(token_E * F_ + latent_E)
        codes = SparseCodes(token_E[order], latent_E[order], pre_E[order], B, F_)
        score_E = score_E[order]
    keep = _topk_within_tokens(codes.token_E, score_E, k, B)
    return codes.take(keep), score_E[keep]


def screened_above_threshold(
    x_BX: Tensor, W_FX: Tensor, b_F: Tensor, w_F: Tensor, threshold: float,
    workspace: Workspace = NO_REUSE, weights_key: tuple | None = None,
) -> tuple[SparseCodes, Tensor]:
    """Every entry with score ``> threshold`` (BatchTopK inference), found exactly."""
    if threshold <= 0:
        raise ValueError("a threshold of 0 or less keeps every positive entry: use the GEMM")
    screen = _Screen(x_BX, W_FX, b_F, w_F, workspace, weights_key)
    codes, score_E = screen.candidates(threshold)
    keep = score_E > threshold
    return codes.take(keep), score_E[keep]


def _topk_within_tokens(token_E: Tensor, score_E: Tensor, k: int, n_tokens: int) -> Tensor:
    """Sorted indices of the (at most) k largest positive scores of each token's run."""
    if token_E.numel() == 0:
        return token_E
    counts_B = torch.bincount(token_E, minlength=n_tokens)
    start_B = torch.cumsum(counts_B, 0) - counts_B
    slot_E = torch.arange(token_E.numel(), device=token_E.device) - start_B[token_E]
    width = int(counts_B.max())
    padded_BM = score_E.new_full((n_tokens, width), -1.0)
    padded_BM[token_E, slot_E] = score_E
    vals_BK, slot_BK = torch.topk(padded_BM, min(k, width), dim=1, sorted=False)
    keep_BK = (start_B[:, None] + slot_BK)[vals_BK > 0]
    return keep_BK.sort().values


def _flat_nonzero(mask: Tensor) -> Tensor:
    """Flat positions of the True entries of a sparse bool tensor (size divisible by 8).

    Finds the non-zero 8-byte words first: ~2x faster than ``nonzero`` on a mostly-False
    mask.
    """
    flat = mask.view(-1)
    words = torch.nonzero(flat.view(torch.int64)).squeeze(1)
    sub = flat.view(-1, 8).index_select(0, words)
    word, offset = torch.nonzero(sub, as_tuple=True)
    return words[word] * 8 + offset


def _bf16_scores(x_BX: Tensor, W_FX: Tensor, b_F: Tensor, w_F: Tensor,
                 workspace: Workspace, weights_key: tuple | None = None) -> Tensor:
    """[B, F] bf16 estimate of ``w * (x @ W.T + b)`` from one bf16 GEMM.

    The bias rides along as an extra input column of ones; the inner dimension is padded
    to a multiple of 32 with zeros, which the GEMM kernels prefer. With ``weights_key``
    (inference) the converted weights are reused while the key is unchanged.
    """
    B, X = x_BX.shape
    F_ = W_FX.shape[0]
    X_pad = _padded_inner(X)
    device = x_BX.device
    x_aug = workspace.get("screen_x", (B, X_pad), torch.bfloat16, device)
    W_aug = workspace.get("screen_W", (F_, X_pad), torch.bfloat16, device)
    x_aug[:, X:].zero_()
    x_aug[:, X] = 1.0
    x_aug[:, :X].copy_(x_BX)

    def fill_weights() -> None:
        W_aug[:, X + 1:].zero_()
        W_aug[:, X].copy_(b_F * w_F)
        tmp = workspace.get("screen_tmp", (_CHUNK, X), x_BX.dtype, device)
        for start in range(0, F_, _CHUNK):
            stop = min(start + _CHUNK, F_)
            chunk = tmp[: stop - start]
            torch.mul(W_FX[start:stop], w_F[start:stop, None], out=chunk)
            W_aug[start:stop, :X].copy_(chunk)

    stamp = None if weights_key is None else (weights_key, W_aug.data_ptr())
    workspace.cached("screen_W_filled", stamp, fill_weights)
    scores = workspace.get("screen_scores", (B, F_), torch.bfloat16, device)
    if x_BX.device.type != "cuda":
        return torch.mm(x_aug, W_aug.T, out=scores)
    # the error bound needs fp32 accumulation: no reduced-precision split-K reductions
    matmul = torch.backends.cuda.matmul
    saved = matmul.allow_bf16_reduced_precision_reduction
    matmul.allow_bf16_reduced_precision_reduction = False
    try:
        return torch.mm(x_aug, W_aug.T, out=scores)
    finally:
        matmul.allow_bf16_reduced_precision_reduction = saved


def _padded_inner(X: int) -> int:
    """The bf16 GEMM's inner dimension: X plus the bias column, to a multiple of 32."""
    return math.ceil((X + 1) / 32) * 32
