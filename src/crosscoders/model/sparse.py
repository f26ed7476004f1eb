"""Sparse codes and the fast TopK/BatchTopK training kernels.

With TopK-style activations only ``E = B * k`` of the ``B * F`` latent activations are
non-zero, so everything after the encoder GEMM is done on the active set:

* selection: exact top entries found by block maxima (a pass over ``B * F / 32`` values)
  instead of a sort of all ``B * F`` scores;
* decode: ``xhat[b] = sum_e f_e W_dec[i_e]`` with ``embedding_bag`` on CPU and a CSR
  product on GPUs, whichever is faster there (cost ``E * S * D``);
* backward: ``df_e = <g_b, W_dec[i_e]>`` by a sampled dense-dense product, and the weight
  gradients of both encoder and decoder as sums grouped by latent (a CSR [F, B] x dense
  product), so no dense ``[B, F]`` gradient is ever formed.

The dense path in :mod:`crosscoders.model.crosscoder` is the reference; tests check both
give the same loss, outputs and gradients.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from crosscoders.model.workspace import NO_REUSE, Workspace

BLOCK = 32  # latents per block for the block-maximum pre-selection


@dataclass
class SparseCodes:
    """The active entries of a [n_tokens, n_latents] code: entry e is latent
    ``latent_E[e]`` of row ``token_E[e]`` with value ``value_E[e]``, sorted by (token,
    latent). The one type for sparse codes: training, inference (``encode_sparse``) and
    the diff analysis all pass these.

    ``value_E`` may carry autograd history; the index tensors never do. What is derived
    from the indices (CSR pointers, the by-latent order) is computed on first use and
    shared with the codes :meth:`with_values` makes.
    """

    token_E: Tensor
    latent_E: Tensor
    value_E: Tensor
    n_tokens: int
    n_latents: int
    #: where the weight gradients go (see :func:`grouped_by_latent`); NO_REUSE: fresh tensors
    workspace: Workspace = field(default=NO_REUSE, repr=False)
    _derived: dict[str, Tensor] = field(default_factory=dict, repr=False, compare=False)

    def with_values(self, value_E: Tensor) -> SparseCodes:
        """The same entries with other values."""
        return SparseCodes(self.token_E, self.latent_E, value_E, self.n_tokens,
                           self.n_latents, self.workspace, self._derived)

    def take(self, keep_E: Tensor) -> SparseCodes:
        """The entries at ``keep_E`` (a bool mask, or ascending indices)."""
        return SparseCodes(self.token_E[keep_E], self.latent_E[keep_E], self.value_E[keep_E],
                           self.n_tokens, self.n_latents, self.workspace)

    def on_latents(self, pos_F: Tensor, n_latents: int) -> SparseCodes:
        """The entries of a subset of ``n_latents`` latents, renumbered: ``pos_F[i]`` is
        latent i's position in the subset (-1: not in it). Positions must follow latent
        order, so the entries stay sorted by (token, position)."""
        pos_E = pos_F[self.latent_E]
        keep = pos_E >= 0
        return SparseCodes(self.token_E[keep], pos_E[keep], self.value_E[keep],
                           self.n_tokens, n_latents)

    def to(self, device: torch.device | str) -> SparseCodes:
        """The codes on ``device`` (the same object if they are there already)."""
        if self.token_E.device == torch.device(device):
            return self
        return SparseCodes(self.token_E.to(device), self.latent_E.to(device),
                           self.value_E.to(device), self.n_tokens, self.n_latents)

    @classmethod
    def from_dense(cls, f_BF: Tensor) -> SparseCodes:
        """The non-zero entries of a dense [B, F] code."""
        token_E, latent_E = f_BF.nonzero(as_tuple=True)
        return cls(token_E, latent_E, f_BF[token_E, latent_E], *f_BF.shape)

    def to_dense(self) -> Tensor:
        """[B, F] dense activations (differentiable in ``value_E``)."""
        f_BF = self.value_E.new_zeros(self.n_tokens * self.n_latents)
        flat = self.token_E * self.n_latents + self.latent_E
        return f_BF.index_put_((flat,), self.value_E).view(self.n_tokens, self.n_latents)

    def _cached(self, name: str, compute) -> Tensor:
        hit = self._derived.get(name)
        if hit is None:
            hit = self._derived[name] = compute()
        return hit

    @property
    def token_offsets_B(self) -> Tensor:
        """Start of each token's entries (bags for ``embedding_bag``)."""
        return self.token_crow[:-1]

    @property
    def token_crow(self) -> Tensor:
        """CSR row pointer [B + 1] over tokens."""
        return self._cached("token_crow", lambda: _crow(self.token_E, self.n_tokens))

    @property
    def latent_order_E(self) -> Tensor:
        """Permutation that groups entries by latent."""
        return self._cached("latent_order_E", lambda: torch.argsort(self.latent_E, stable=True))

    @property
    def tokens_by_latent_E(self) -> Tensor:
        return self._cached("tokens_by_latent_E", lambda: self.token_E[self.latent_order_E])

    @property
    def latent_crow(self) -> Tensor:
        """CSR row pointer [F + 1] over latents (entries in ``latent_order_E``)."""
        return self._cached("latent_crow", lambda: _crow(self.latent_E, self.n_latents))

    def sum_by_latent(self, values_E: Tensor) -> Tensor:
        """[F] sum of ``values_E`` over each latent's entries, in a fixed order.

        On CUDA ``index_add_`` adds with atomics in whatever order threads arrive, so two
        runs differ in the last bits; a float64 prefix sum over the latent-sorted entries
        gives the same bits every run (and the same sums to ~1e-16 relative).
        """
        if values_E.device.type == "cpu":  # index_add_ is sequential, hence exact-order
            return values_E.new_zeros(self.n_latents).index_add_(0, self.latent_E, values_E)
        csum = torch.cumsum(values_E[self.latent_order_E].double(), 0)
        csum = torch.cat([csum.new_zeros(1), csum])
        crow = self.latent_crow
        return (csum[crow[1:]] - csum[crow[:-1]]).to(values_E.dtype)


def _crow(index_E: Tensor, n: int) -> Tensor:
    """CSR row pointer [n + 1] of entries grouped by ``index_E``."""
    counts = torch.bincount(index_E, minlength=n)
    return torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])


def grouped_by_latent(codes: SparseCodes, weights_E: Tensor, dense_BX: Tensor,
                      name: str) -> Tensor:
    """[F, X] with row i = sum over entries e of latent i of ``weights_e * dense[token_e]``.

    This is the weight gradient of both the encoder and the decoder. It runs as a CSR
    [F, B] x dense [B, X] product written into a buffer of ``codes.workspace``: allocating
    10s of MB afresh each step costs more than the product (page faults), so the trainer
    reuses them. A returned buffer is overwritten by the next step, so callers must drop
    it first (``zero_grad(set_to_none=True)`` does).
    """
    F_, X = codes.n_latents, dense_BX.shape[1]
    order = codes.latent_order_E
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
        csr_FB = torch.sparse_csr_tensor(
            codes.latent_crow, codes.tokens_by_latent_E, weights_E[order],
            size=(F_, codes.n_tokens), check_invariants=False,
        )
        out = codes.workspace.get(name, (F_, X), dense_BX.dtype, dense_BX.device)
        return torch.addmm(out, csr_FB, dense_BX, beta=0.0, out=out)


# ---------------------------------------------------------------------------------------
# selection


def topk_per_token(scores_BF: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Indices of the k largest positive scores of each row, sorted by (token, latent)."""
    B, F_ = scores_BF.shape
    k = min(k, F_)
    vals_BK, idx_BK = torch.topk(scores_BF, k, dim=1, sorted=False)
    keep = vals_BK > 0
    idx_BK = torch.where(keep, idx_BK, F_)  # push dropped entries to the end of the sort
    idx_BK = idx_BK.sort(dim=1).values
    token_BK = torch.arange(B, device=scores_BF.device).unsqueeze(1).expand(B, k)
    keep = idx_BK < F_
    return token_BK[keep], idx_BK[keep]


def batch_topk(scores_BF: Tensor, n_keep: int, hint: float | None = None) -> tuple[Tensor, Tensor]:
    """Exact positions of the ``n_keep`` largest positive entries of a [B, F] matrix.

    Returns (token_idx, latent_idx) sorted by flat position. With fewer than ``n_keep``
    positive entries, all positive entries are returned. ``hint`` (e.g. the previous
    step's cut-off) only changes the speed, never the result.

    Exactness of the block pre-selection: if ``m`` is the ``n_keep``-th largest block
    maximum, every one of the top ``n_keep`` entries lies in a block whose maximum is at
    least ``m`` (otherwise ``n_keep`` blocks would each hold an entry above it).
    """
    B, F_ = scores_BF.shape
    flat = scores_BF.reshape(-1)
    n = flat.numel()
    if n_keep >= n or F_ % BLOCK != 0:
        return _plain_batch_topk(flat, n_keep, F_)
    blocks = flat.view(-1, BLOCK)
    block_max = blocks.amax(dim=1)
    cut = None
    if hint is not None and hint > 0:
        cut = torch.tensor(hint, dtype=flat.dtype, device=flat.device)
        n_blocks = int((block_max >= cut).sum())
        if n_blocks < n_keep // BLOCK + 1:
            cut = None
    if cut is None:
        n_top_blocks = min(n_keep, block_max.numel())
        cut = torch.topk(block_max, n_top_blocks, sorted=False).values.min()
    cut = torch.clamp_min(cut, torch.finfo(flat.dtype).tiny)  # positive entries only
    block_ids = torch.nonzero(block_max >= cut).squeeze(1)
    cand_BLK = blocks.index_select(0, block_ids)
    row, col = torch.nonzero(cand_BLK >= cut, as_tuple=True)
    cand_vals = cand_BLK[row, col]
    cand_flat = block_ids[row] * BLOCK + col  # ascending: nonzero walks row-major
    if cand_vals.numel() < n_keep:
        if hint is not None:  # the hint was too high: redo without it (still exact)
            return batch_topk(scores_BF, n_keep, None)
        # fewer candidates than n_keep can only mean fewer positive entries than n_keep
        positive = torch.nonzero(flat > 0).squeeze(1)
        return positive // F_, positive % F_
    if cand_vals.numel() > n_keep:
        keep = torch.topk(cand_vals, n_keep, sorted=False).indices
        cand_flat = cand_flat[keep].sort().values
    return cand_flat // F_, cand_flat % F_


def entries_at_least(scores_BF: Tensor, cut: float) -> tuple[Tensor, Tensor]:
    """(token_idx, latent_idx) of every entry ``>= cut`` (> 0), sorted by flat position."""
    B, F_ = scores_BF.shape
    flat = scores_BF.reshape(-1)
    cut_t = torch.clamp_min(torch.tensor(cut, dtype=flat.dtype, device=flat.device),
                            torch.finfo(flat.dtype).tiny)
    if F_ % BLOCK != 0:
        idx = torch.nonzero(flat >= cut_t).squeeze(1)
        return idx // F_, idx % F_
    blocks = flat.view(-1, BLOCK)
    block_ids = torch.nonzero(blocks.amax(dim=1) >= cut_t).squeeze(1)
    row, col = torch.nonzero(blocks.index_select(0, block_ids) >= cut_t, as_tuple=True)
    idx = block_ids[row] * BLOCK + col
    return idx // F_, idx % F_


def _plain_batch_topk(flat: Tensor, n_keep: int, F_: int) -> tuple[Tensor, Tensor]:
    n_keep = min(n_keep, flat.numel())
    vals, idx = torch.topk(flat, n_keep, sorted=False)
    idx = idx[vals > 0].sort().values
    return idx // F_, idx % F_


# ---------------------------------------------------------------------------------------
# autograd kernels


class _GatherPreacts(torch.autograd.Function):
    """pre_E = (x @ W_enc + b_enc)[token_e, latent_e], with a sparse backward.

    The forward value is computed by the caller (from its GEMM) and passed in detached.
    """

    @staticmethod
    def forward(ctx, pre_E, x_BX, W_enc_FSD, b_enc_F, codes):  # noqa: D102
        ctx.codes = codes
        ctx.save_for_backward(x_BX, W_enc_FSD)
        return pre_E.clone()

    @staticmethod
    def backward(ctx, grad_E):  # noqa: D102
        codes: SparseCodes = ctx.codes
        x_BX, W_enc_FSD = ctx.saved_tensors
        F_, S, D = W_enc_FSD.shape
        grad_W = grad_b = grad_x = None
        if ctx.needs_input_grad[2]:
            grad_W = grouped_by_latent(codes, grad_E, x_BX, "grad_W_enc").view(F_, S, D)
        if ctx.needs_input_grad[3]:
            grad_b = codes.sum_by_latent(grad_E)
        if ctx.needs_input_grad[1]:
            dense = codes.with_values(grad_E).to_dense()
            grad_x = dense @ W_enc_FSD.reshape(F_, S * D)
        return None, grad_x, grad_W, grad_b, None


def decode_rows(codes: SparseCodes, values_E: Tensor, W_FX: Tensor,
                method: str | None = None) -> Tensor:
    """[B, X] with row b = sum over token b's entries of ``values_e * W[latent_e]``.

    ``method``: ``"embedding_bag"`` (fastest on CPU) or ``"csr"`` (a token-major CSR
    [B, F] x dense [F, X] product; on an H200 4.3x faster than embedding_bag at
    Gemma-2-2b scale, docs/benchmarks.md); None picks by device. Both are exact sums of
    the same terms, in different orders.
    """
    method = method or ("embedding_bag" if W_FX.device.type == "cpu" else "csr")
    if method == "embedding_bag":
        return F.embedding_bag(codes.latent_E, W_FX, codes.token_offsets_B, mode="sum",
                               per_sample_weights=values_E.to(W_FX.dtype))
    with warnings.catch_warnings(), torch.autocast(W_FX.device.type, enabled=False):
        warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
        csr_BF = torch.sparse_csr_tensor(codes.token_crow, codes.latent_E,
                                         values_E.to(W_FX.dtype),
                                         size=(codes.n_tokens, len(W_FX)),
                                         check_invariants=False)
        return csr_BF @ W_FX


class _SparseDecode(torch.autograd.Function):
    """out[b] = sum_{e in token b} values_e * W_dec[latent_e] + b_dec."""

    @staticmethod
    def forward(ctx, values_E, W_dec_FSD, b_dec_X, codes):  # noqa: D102
        ctx.codes = codes
        ctx.save_for_backward(values_E, W_dec_FSD)
        out = decode_rows(codes, values_E, W_dec_FSD.reshape(len(W_dec_FSD), -1))
        if b_dec_X is not None:
            out.add_(b_dec_X)  # in place: no second [B, X] tensor
        return out

    @staticmethod
    def backward(ctx, grad_BX):  # noqa: D102
        codes: SparseCodes = ctx.codes
        values_E, W_dec_FSD = ctx.saved_tensors
        F_, S, D = W_dec_FSD.shape
        grad_BX = grad_BX.contiguous()
        grad_values = grad_W = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_values = sampled_dot(grad_BX, W_dec_FSD.reshape(F_, S * D), codes)
        if ctx.needs_input_grad[1]:
            grad_W = grouped_by_latent(codes, values_E, grad_BX, "grad_W_dec").view(F_, S, D)
        if ctx.needs_input_grad[2]:
            grad_b = grad_BX.sum(0)
        return grad_values, grad_W, grad_b, None


class _SquaredError(torch.autograd.Function):
    """sum ||xhat - x||^2 / n, keeping the difference for the backward (in a buffer)."""

    @staticmethod
    def forward(ctx, x_BX, xhat_BX, workspace, n_tokens):  # noqa: D102
        diff_BX = workspace.get("diff", tuple(x_BX.shape), x_BX.dtype, x_BX.device)
        torch.sub(xhat_BX, x_BX, out=diff_BX)
        ctx.diff_BX = diff_BX
        ctx.n_tokens = n_tokens
        flat = diff_BX.view(-1)
        return torch.dot(flat, flat) / n_tokens

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):  # noqa: D102
        diff_BX = ctx.diff_BX
        del ctx.diff_BX  # the buffer becomes the gradient: a second backward must fail
        grad_xhat = diff_BX.mul_(grad * (2.0 / ctx.n_tokens))
        grad_x = -grad_xhat if ctx.needs_input_grad[0] else None
        return grad_x, grad_xhat, None, None


def squared_error(x_BX: Tensor, xhat_BX: Tensor, workspace: Workspace = NO_REUSE,
                  n_tokens: int | None = None) -> Tensor:
    """``((x - xhat) ** 2).sum(-1).mean()`` with one [B, X] temporary, reused via workspace.

    ``n_tokens``: divide by this instead of B (a data-parallel rank's share of the mean
    over the global batch).
    """
    return _SquaredError.apply(x_BX, xhat_BX, workspace, n_tokens or x_BX.shape[0])


def sampled_dot(a_BX: Tensor, b_FX: Tensor, codes: SparseCodes) -> Tensor:
    """out_e = <a[token_e], b[latent_e]> for every active entry (SDDMM).

    Runs latent-major (a CSR [F, B] pattern): each row of ``b`` is read once and the
    smaller ``a`` is gathered, 1.5x faster on CPU than the token-major order.
    """
    if codes.token_E.numel() == 0:
        return a_BX.new_zeros(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
        pattern = torch.sparse_csr_tensor(
            codes.latent_crow, codes.tokens_by_latent_E,
            a_BX.new_zeros(codes.latent_E.numel()),
            size=(codes.n_latents, codes.n_tokens), check_invariants=False,
        )
        by_latent_E = torch.sparse.sampled_addmm(pattern, b_FX, a_BX.T, beta=0.0).values()
    return torch.empty_like(by_latent_E).index_copy_(0, codes.latent_order_E, by_latent_E)


def gather_preacts(
    pre_E: Tensor, x_BX: Tensor, W_enc_FSD: Tensor, b_enc_F: Tensor, codes: SparseCodes
) -> Tensor:
    """Differentiable view of the selected pre-activations (see :class:`_GatherPreacts`)."""
    return _GatherPreacts.apply(pre_E.detach(), x_BX, W_enc_FSD, b_enc_F, codes)


def sparse_decode(codes: SparseCodes, W_dec_FSD: Tensor, b_dec: Tensor | None = None) -> Tensor:
    """[B, S*D] decoder output of sparse codes (``decode`` from the active entries only),
    plus ``b_dec`` when given; differentiable in the values, ``W_dec`` and ``b_dec``."""
    b_dec_X = None if b_dec is None else b_dec.reshape(-1)
    return _SparseDecode.apply(codes.value_E, W_dec_FSD, b_dec_X, codes)
