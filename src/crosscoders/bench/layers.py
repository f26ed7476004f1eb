"""Cross-layer crosscoder vs one SAE per layer, on features planted across layers.

A feature that persists across layers is one latent in a cross-layer crosscoder but one
latent per layer in per-layer SAEs, so at matched reconstruction error the crosscoder
should need fewer active latents in total (Anthropic reports 15-40x on an 18-layer model;
the ratio grows with how far features persist). ``crosscoders bench layers`` measures it
here: it trains BatchTopK crosscoders and per-layer BatchTopK SAEs over a range of k, and
reads off the SAEs' total L0 at each crosscoder's FVU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from crosscoders import Crosscoder, CrosscoderConfig, TrainConfig, train


def planted_layer_data(n: int = 32768, n_layers: int = 4, d_model: int = 24,
                       fire_prob: float = 0.04, noise: float = 0.01, seed: int = 0
                       ) -> tuple[Tensor, Tensor, np.ndarray]:
    """Activations [n, S, D] of features that each write to a span of consecutive layers.

    Returns (acts, directions [P, S, D] (zero outside each span), span lengths [P]). Every
    layer gets 4 single-layer features; 3 of each shorter multi-layer span; 9 span all.
    """
    S, D = n_layers, d_model
    gen = torch.Generator().manual_seed(seed)
    spans = [(s, s) for s in range(S)] * 4
    spans += [(a, a + w - 1) for w in range(2, S) for a in range(S - w + 1)] * 3
    spans += [(0, S - 1)] * 9
    mask_PS = torch.zeros(len(spans), S)
    for p, (a, b) in enumerate(spans):
        mask_PS[p, a:b + 1] = 1
    dirs_PSD = torch.randn(len(spans), S, D, generator=gen)
    dirs_PSD = dirs_PSD / dirs_PSD.norm(dim=-1, keepdim=True) * mask_PS[..., None]
    fires_NP = torch.rand(n, len(spans), generator=gen) < fire_prob
    codes_NP = fires_NP * torch.exp(0.4 * torch.randn(n, len(spans), generator=gen))
    acts = torch.einsum("np,psd->nsd", codes_NP, dirs_PSD)
    acts += noise * torch.randn(n, S, D, generator=gen)
    return acts, dirs_PSD, np.array([b - a + 1 for a, b in spans])


@dataclass
class Point:
    k: int
    l0: float  # active latents per token, summed over the SAEs for per-layer
    fvu: float  # pooled over all layers


def _fvu_and_l0(models: list[Crosscoder], x_NSD: Tensor) -> tuple[float, float]:
    """Total FVU and L0 of one crosscoder over all layers, or of one SAE per layer."""
    from crosscoders.metrics import ReconstructionMetrics

    metrics = ReconstructionMetrics(x_NSD.shape[1], x_NSD.shape[2])
    with torch.no_grad():
        if len(models) == 1:
            f = models[0].encode(x_NSD)
            metrics.update(x_NSD, models[0].decode(f), f)
        else:  # L0: the SAEs' active latents on a token, summed
            codes = [m.encode(x_NSD[:, s:s + 1]) for s, m in enumerate(models)]
            xhat = torch.cat([m.decode(f) for m, f in zip(models, codes)], dim=1)
            metrics.update(x_NSD, xhat, n_active=sum(int((f != 0).sum()) for f in codes))
    result = metrics.result()
    return result.fvu, result.l0


def compare_with_per_layer_saes(
    acts: Tensor, crosscoder_ks: tuple[int, ...] = (2, 4, 6, 8, 12, 16),
    per_layer_ks: tuple[int, ...] = (1, 2, 3, 4, 6), dict_size: int = 128,
    steps: int = 1000, batch_size: int = 512, eval_tokens: int = 4096, seed: int = 0,
) -> dict:
    """Train crosscoders and sets of per-layer SAEs (``dict_size`` latents each) over a
    range of k; compare the total L0 each needs for the same pooled FVU."""
    S, D = acts.shape[1], acts.shape[2]
    train_x, eval_x = acts[:-eval_tokens], acts[-eval_tokens:]
    tc = TrainConfig(steps=steps, batch_size=batch_size, progress=False, eval_tokens=0,
                     seed=seed)
    crosscoder, per_layer = [], []
    for k in crosscoder_ks:
        cc = train(CrosscoderConfig(n_sources=S, d_model=D, dict_size=dict_size, k=k,
                                    seed=seed), train_x, tc)
        fvu, l0 = _fvu_and_l0([cc], eval_x)
        crosscoder.append(Point(k, l0, fvu))
    for k in per_layer_ks:
        saes = [train(CrosscoderConfig(n_sources=1, d_model=D, dict_size=dict_size, k=k,
                                       seed=seed), train_x[:, s:s + 1].contiguous(), tc)
                for s in range(S)]
        fvu, l0 = _fvu_and_l0(saes, eval_x)
        per_layer.append(Point(k, l0, fvu))
    lo = max(min(p.fvu for p in crosscoder), min(p.fvu for p in per_layer))
    hi = min(max(p.fvu for p in crosscoder), max(p.fvu for p in per_layer))
    matched = []
    if lo < hi:  # FVU levels both curves reach: a geometric grid over the overlap
        for fvu in np.geomspace(hi, lo, 5):
            cc_l0, sae_l0 = _l0_at_fvu(crosscoder, fvu), _l0_at_fvu(per_layer, fvu)
            if cc_l0 is not None and sae_l0 is not None:
                matched.append({"fvu": float(fvu), "crosscoder_l0": cc_l0,
                                "per_layer_l0": sae_l0, "ratio": sae_l0 / cc_l0})
    return {"n_layers": S, "d_model": D, "dict_size": dict_size, "steps": steps,
            "crosscoder": [p.__dict__ for p in crosscoder],
            "per_layer_saes": [p.__dict__ for p in per_layer], "matched": matched}


def _l0_at_fvu(points: list[Point], fvu: float) -> float | None:
    """Total L0 needed for ``fvu``: log-linear interpolation between measured points
    (sorted by L0); None outside the measured range."""
    pts = sorted(points, key=lambda p: p.l0)
    for lo, hi in zip(pts, pts[1:]):
        if min(lo.fvu, hi.fvu) <= fvu <= max(lo.fvu, hi.fvu) and lo.fvu != hi.fvu:
            t = (math.log(fvu) - math.log(lo.fvu)) / (math.log(hi.fvu) - math.log(lo.fvu))
            return lo.l0 + t * (hi.l0 - lo.l0)
    return None


def format_comparison(result: dict) -> str:
    lines = [f"{result['n_layers']} layers, d_model {result['d_model']}, {result['dict_size']} "
             f"latents per model, {result['steps']} steps; FVU pooled over layers, held out"]
    for name, key in (("crosscoder", "crosscoder"), ("per-layer SAEs", "per_layer_saes")):
        pts = ", ".join(f"k={p['k']}: L0 {p['l0']:.2f} FVU {p['fvu']:.4f}" for p in result[key])
        lines.append(f"{name}: {pts}")
    lines.append(f"{'FVU':>8} {'crosscoder L0':>14} {'per-layer SAEs L0':>18} {'ratio':>7}")
    for m in result["matched"]:
        lines.append(f"{m['fvu']:>8.4f} {m['crosscoder_l0']:>14.2f} {m['per_layer_l0']:>18.2f} "
                     f"{m['ratio']:>6.2f}x")
    if not result["matched"]:
        lines.append("the two FVU ranges do not overlap: widen the k ranges")
    return "\n".join(lines)
