"""The training loss of one batch, computed densely (the reference) or sparsely (fast).

    loss = mean_B sum_S ||x - xhat||^2                   (squared error, as in the paper)
         + sparsity_coeff * activation.sparsity_loss      (L1 / tanh; 0 for TopK-style)
         + auxk_coeff * AuxK                              (TopK-style, when latents are dead)

AuxK (OpenAI's TopK recipe): the ``auxk_k`` dead latents with the largest weighted
pre-activations reconstruct the residual ``e = x - xhat``; the loss is the normalised
MSE ``sum ||e - ehat||^2 / sum ||e - mean(e)||^2``, which revives dead latents.
Both paths take ``x`` already normalised, and return the same :class:`LossTerms`.

Under data parallelism (``dp``, see :mod:`crosscoders.train.distributed`) ``x`` is this
rank's slice of the global batch. Means over the batch become this rank's sums divided by
the global batch size, AuxK's denominator and BatchTopK's cut are computed over the global
batch, so the ranks' gradients sum to the single-process gradient. The returned terms are
this rank's shares (sum them over the ranks for the global values); ``fired_F``, ``l0``
and ``min_kept_score`` are this rank's own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from crosscoders.model import Crosscoder
from crosscoders.model.activations import BatchTopK, TopK
from crosscoders.model.screen import (
    SCREEN_BLOCK,
    screened_batch_topk,
    screened_topk_per_token,
)
from crosscoders.model.sparse import (
    SparseCodes,
    batch_topk,
    entries_at_least,
    gather_preacts,
    sparse_decode,
    squared_error,
    topk_per_token,
)
from crosscoders.model.workspace import Workspace
from crosscoders.train.distributed import DataParallel, global_top


@dataclass
class StepKnobs:
    """Per-step settings that schedules change over training."""

    sparsity_coeff: float = 0.0
    k: int | None = None
    auxk_coeff: float = 0.0
    auxk_k: int = 0
    dead_F: Tensor | None = None  # bool mask of dead latents
    threshold_hint: float | None = None


@dataclass
class LossTerms:
    total: Tensor
    recon: Tensor
    sparsity: Tensor
    auxk: Tensor
    xhat_BSD: Tensor  # detached
    fired_F: Tensor  # bool: latent active on some token of the batch
    l0: float  # mean active latents per token
    min_kept_score: float | None  # BatchTopK: smallest kept weighted value


def recon_loss(x_BSD: Tensor, xhat_BSD: Tensor) -> Tensor:
    return (x_BSD - xhat_BSD).pow(2).sum(dim=(1, 2)).mean()


def _auxk_loss(resid_BX: Tensor, ehat_BX: Tensor, dp: DataParallel | None = None) -> Tensor:
    """Normalised MSE of the residual's reconstruction; with ``dp`` this rank's share, its
    denominator (the residual's variance about its mean) over the global batch."""
    if dp is None or dp.world_size == 1:
        denom = (resid_BX - resid_BX.mean(0)).pow(2).sum()
    else:
        with torch.no_grad():  # the residual is detached: the denominator is a constant
            n = resid_BX.shape[0] * dp.world_size
            mean_X = dp.all_reduce_(resid_BX.sum(0), what="the AuxK residual mean") / n
            denom = dp.all_reduce_((resid_BX - mean_X).pow(2).sum(),
                                   what="the AuxK residual variance")
    return (resid_BX - ehat_BX).pow(2).sum() / denom.clamp_min(1e-12)


def global_batch_topk(scores_BF: Tensor, n_keep: int, hint: float | None,
                      dp: DataParallel) -> tuple[Tensor, Tensor]:
    """This rank's entries of the ``n_keep`` largest positive scores of all ranks' rows.

    Every rank proposes candidates: its entries at or above ``hint`` (the last step's cut,
    lowered) when all ranks' together number at least ``n_keep`` (then they hold the global
    top), else its own top ``n_keep``. The ranks gather the candidates' values and keep the
    ``n_keep`` largest (:func:`global_top`): the selection one process makes on the whole
    batch (which of several entries tied at the cut are kept aside).
    """
    if hint is not None and hint > 0:
        token_idx, latent_idx = entries_at_least(scores_BF, hint)
        values_E = scores_BF[token_idx, latent_idx]
        parts = dp.gather_values(values_E, "the global BatchTopK selection")
        if sum(p.numel() for p in parts) >= n_keep:
            keep = global_top(dp, values_E, n_keep, parts)
            return token_idx[keep], latent_idx[keep]
    token_idx, latent_idx = batch_topk(scores_BF, n_keep)
    keep = global_top(dp, scores_BF[token_idx, latent_idx], n_keep)
    return token_idx[keep], latent_idx[keep]


def _is_global(act, dp: DataParallel | None, batchtopk_scope: str) -> bool:
    return (isinstance(act, BatchTopK) and dp is not None and dp.world_size > 1
            and batchtopk_scope == "global")


def dense_loss(model: Crosscoder, x_BSD: Tensor, knobs: StepKnobs,
               dp: DataParallel | None = None, batchtopk_scope: str = "global") -> LossTerms:
    """Reference path: dense [B, F] activations and plain autograd."""
    act = model.activation
    B, S, D = x_BSD.shape
    world = dp.world_size if dp is not None else 1
    w_F = model.decoder_norm_weights()
    pre_BF = model.preactivations(x_BSD)
    min_kept = None
    if isinstance(act, (TopK, BatchTopK)):
        k = knobs.k or act.k
        scores_BF = torch.relu(pre_BF) * w_F
        if _is_global(act, dp, batchtopk_scope):
            token_idx, latent_idx = global_batch_topk(scores_BF.detach(), k * B * world,
                                                      None, dp)
        else:
            token_idx, latent_idx = act.select(scores_BF.detach(), k)
        mask_BF = torch.zeros_like(pre_BF, dtype=torch.bool)
        mask_BF[token_idx, latent_idx] = True
        f_BF = torch.where(mask_BF, torch.relu(pre_BF), 0.0)
        if isinstance(act, BatchTopK) and token_idx.numel():
            min_kept = float(scores_BF.detach()[token_idx, latent_idx].min())
    else:
        f_BF = act(pre_BF, w_F)
    xhat_BSD = model.decode(f_BF)
    share = B / (B * world)  # batch means become this rank's share of the global mean
    recon = recon_loss(x_BSD, xhat_BSD) * share
    w_penalty_F = model.sparsity_weights() if model.config.n_shared_latents else w_F
    sparsity = act.sparsity_loss(f_BF, pre_BF, w_penalty_F) * share
    auxk = pre_BF.new_zeros(())
    dead = knobs.dead_F
    if act.is_topk and knobs.auxk_coeff > 0 and dead is not None and bool(dead.any()):
        k_aux = min(knobs.auxk_k, int(dead.sum()))
        dead_scores = torch.where(dead, torch.relu(pre_BF) * w_F, 0.0).detach()
        token_idx, latent_idx = topk_per_token(dead_scores, k_aux)
        mask_BF = torch.zeros_like(pre_BF, dtype=torch.bool)
        mask_BF[token_idx, latent_idx] = True
        f_aux_BF = torch.where(mask_BF, torch.relu(pre_BF), 0.0)
        ehat_BX = f_aux_BF @ model.W_dec.reshape(model.dict_size, S * D)
        resid_BX = (x_BSD - xhat_BSD).detach().reshape(B, S * D)
        auxk = _auxk_loss(resid_BX, ehat_BX, dp)
    total = recon + knobs.sparsity_coeff * sparsity + knobs.auxk_coeff * auxk
    active_BF = f_BF.detach() != 0
    return LossTerms(
        total, recon, sparsity, auxk, xhat_BSD.detach(), active_BF.any(0),
        float(active_BF.sum()) / B, min_kept,
    )


class SparseStep:
    """Fast path for TopK/BatchTopK: see :mod:`crosscoders.model.sparse`.

    Holds reusable workspaces (the [B, F] scores, the scaled encoder, the weight
    gradients) because allocating them afresh every step costs more than the arithmetic
    on them. The gradients it produces alias those buffers: the caller must drop them
    before the next step (``optimizer.zero_grad(set_to_none=True)``), as the trainer does.
    """

    def __init__(self, screen: bool = False, dp: DataParallel | None = None,
                 batchtopk_scope: str = "global") -> None:
        #: BatchTopK selection by a bf16 GEMM plus exact recomputation (model/screen.py)
        self.screen = screen
        self.dp = dp
        #: data-parallel BatchTopK: select over the global batch, or over each rank's rows
        self.batchtopk_scope = batchtopk_scope
        #: [B, F] scores, scaled encoder, the screen's buffers, the weight gradients
        #: (see grouped_by_latent) and the squared error's difference
        self.workspace = Workspace()

    def _uses_screen(self, model: Crosscoder, x_BSD: Tensor) -> bool:
        return (self.screen and isinstance(model.activation, (TopK, BatchTopK))
                and x_BSD.dtype == torch.float32
                and model.dict_size % SCREEN_BLOCK == 0
                and not torch.is_autocast_enabled(x_BSD.device.type))

    def select(self, model: Crosscoder, x_BX: Tensor, w_F: Tensor, knobs: StepKnobs
                ) -> tuple[SparseCodes, Tensor, Tensor | None]:
        """The latents a flattened batch ``x_BX`` keeps: (the kept entries with their
        pre-activations, their weighted scores, the [B, F] scores or None when screened).
        The step's first stage; benchmarks time it alone."""
        act = model.activation
        k = knobs.k or act.k
        B, X = x_BX.shape
        F_ = model.dict_size
        W_enc_FX = model.W_enc_FSD.detach().reshape(F_, X)
        b_enc_F = model.b_enc.detach()
        is_global = _is_global(act, self.dp, self.batchtopk_scope)
        ws = self.workspace
        if self._uses_screen(model, x_BX):
            if is_global:  # this rank's top k * B_global, cut down to the global top
                n_keep = k * B * self.dp.world_size
                codes, kept_E = screened_batch_topk(x_BX, W_enc_FX, b_enc_F, w_F, n_keep,
                                                    None, ws)
                keep = global_top(self.dp, kept_E, n_keep)
                codes, kept_E = codes.take(keep), kept_E[keep]
            elif isinstance(act, BatchTopK):
                codes, kept_E = screened_batch_topk(x_BX, W_enc_FX, b_enc_F, w_F, k * B,
                                                    knobs.threshold_hint, ws)
            else:
                codes, kept_E = screened_topk_per_token(x_BX, W_enc_FX, b_enc_F, w_F, k, ws)
            return codes, kept_E, None
        # GEMM on the norm-weighted encoder: scores = pre * w directly, no extra pass.
        # Under autocast the scaled encoder is written straight in bf16 and the selection
        # reads the bf16 scores (the order their fp32 copies would have): no cast passes.
        dtype = torch.bfloat16 if torch.is_autocast_enabled(x_BX.device.type) else x_BX.dtype
        W_scaled_FX = ws.get("W_scaled", (F_, X), dtype, x_BX.device)
        torch.mul(W_enc_FX, w_F[:, None], out=W_scaled_FX)
        scores_BF = ws.get("scores", (B, F_), dtype, x_BX.device)
        with torch.autocast(x_BX.device.type, enabled=False):
            torch.addmm((b_enc_F * w_F).to(dtype), x_BX.to(dtype), W_scaled_FX.T, out=scores_BF)
        if is_global:
            token_idx, latent_idx = global_batch_topk(
                scores_BF, k * B * self.dp.world_size, knobs.threshold_hint, self.dp)
        elif isinstance(act, BatchTopK):
            token_idx, latent_idx = act.select(scores_BF, k, knobs.threshold_hint)
        else:
            token_idx, latent_idx = act.select(scores_BF, k)
        kept_E = scores_BF[token_idx, latent_idx].to(x_BX.dtype)
        codes = SparseCodes(token_idx, latent_idx, kept_E / w_F[latent_idx], B, F_)
        return codes, kept_E, scores_BF

    def __call__(self, model: Crosscoder, x_BSD: Tensor, knobs: StepKnobs) -> LossTerms:
        act = model.activation
        B, S, D = x_BSD.shape
        F_ = model.dict_size
        x_BX = x_BSD.reshape(B, S * D)
        with torch.no_grad():
            w_F = model.decoder_norm_weights()
            codes, kept_scores_E, scores_BF = self.select(model, x_BX, w_F, knobs)
        codes.workspace = self.workspace  # the weight gradients go to reused buffers
        pre_E = codes.value_E
        values_E = torch.relu(gather_preacts(pre_E, x_BX, model.W_enc_FSD, model.b_enc, codes))
        codes = codes.with_values(values_E)
        xhat_BX = sparse_decode(codes, model.W_dec, model.b_dec)
        xhat_BSD = xhat_BX.view(B, S, D)
        world = self.dp.world_size if self.dp is not None else 1
        recon = squared_error(x_BX, xhat_BX, self.workspace, n_tokens=B * world)
        zero = x_BSD.new_zeros(())
        auxk = zero
        dead = knobs.dead_F
        if knobs.auxk_coeff > 0 and dead is not None and bool(dead.any()):
            auxk = self._auxk(model, x_BX, xhat_BX.detach(), scores_BF, w_F, dead, knobs)
        total = recon + knobs.auxk_coeff * auxk
        fired_F = torch.zeros(F_, dtype=torch.bool, device=x_BSD.device)
        fired_F[codes.latent_E[values_E.detach() > 0]] = True
        min_kept = None
        if isinstance(act, BatchTopK) and kept_scores_E.numel():
            min_kept = float(kept_scores_E.min())
        l0 = float((values_E.detach() > 0).sum()) / B
        return LossTerms(total, recon, zero, auxk, xhat_BSD.detach(), fired_F, l0, min_kept)

    def _auxk(self, model: Crosscoder, x_BX: Tensor, xhat_BX: Tensor, scores_BF: Tensor | None,
              w_F: Tensor, dead_F: Tensor, knobs: StepKnobs) -> Tensor:
        B = x_BX.shape[0]
        k_aux = min(knobs.auxk_k, int(dead_F.sum()))
        with torch.no_grad():
            if scores_BF is not None:
                scores_BF.mul_(dead_F)  # the buffer is free now: keep only dead latents
                token_idx, latent_idx = topk_per_token(scores_BF, k_aux)
                pre_E = scores_BF[token_idx, latent_idx] / w_F[latent_idx]
            else:  # screened selection: fp32 scores of the dead latents only
                dead_idx = torch.nonzero(dead_F).squeeze(1)
                W_dead = model.W_enc_FSD.detach().reshape(model.dict_size, -1)[dead_idx]
                pre_BN = torch.addmm(model.b_enc.detach()[dead_idx], x_BX, W_dead.T)
                token_idx, pos = topk_per_token(torch.relu(pre_BN) * w_F[dead_idx], k_aux)
                pre_E = pre_BN[token_idx, pos]
                latent_idx = dead_idx[pos]  # dead_idx ascends: still sorted by latent
        # fresh gradient tensors here (the codes' default workspace keeps none): AuxK only
        # runs while latents are dead, and a second set of persistent [F, X] buffers would
        # cost more memory than the faults cost time
        codes = SparseCodes(token_idx, latent_idx, pre_E, B, model.dict_size)
        values_E = torch.relu(gather_preacts(pre_E, x_BX, model.W_enc_FSD, model.b_enc, codes))
        ehat_BX = sparse_decode(codes.with_values(values_E), model.W_dec)
        return _auxk_loss(x_BX - xhat_BX, ehat_BX, self.dp)
