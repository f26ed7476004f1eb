"""One streaming pass over activations: encode once, feed every per-latent statistic.

The analysis reads its data through :class:`RowSource` (a tensor [N, S, D] with optional
token ids, or an activation store), in order, one batch at a time. :func:`analysis_pass`
encodes each batch once and hands an :class:`EncodedBatch` to every consumer
(:class:`ActivationStats` here, Latent Scaling, max-activating examples), so all of them
share one read of the data and one encoder GEMM. Consumers keep state whose size depends
on the number of latents, never on the number of tokens.

The latent code of a batch is kept sparse (:class:`~crosscoders.model.sparse.SparseCodes`:
row, latent and value of the E non-zero entries), so the bookkeeping costs O(E) instead of
O(B * F), and the reconstruction is decoded from the active set only (cost E * S * D).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from crosscoders.errors import DataError
from crosscoders.metrics import ReconstructionMetrics
from crosscoders.model.sparse import SparseCodes, sparse_decode

# --------------------------------------------------------------------------------------------
# Reading rows


class RowSource(Protocol):
    """Activations [N, S, D] read in order, with token ids and context windows if known."""

    n_tokens: int
    n_sources: int
    d_model: int

    def read(self, start: int, stop: int) -> Tensor:
        """Rows ``[start, stop)`` as float32 [n, S, D]."""

    def gather(self, index: np.ndarray) -> Tensor:
        """Rows at ``index`` as float [n, S, D]."""

    def tokens(self, start: int, stop: int) -> np.ndarray | None:
        """Token id of rows ``[start, stop)`` ([n] int64), or None if unknown."""

    def window(self, row: int, before: int, after: int) -> tuple[np.ndarray, np.ndarray, int]:
        """Token ids around ``row`` in its context, the row index of each (-1 if the position
        was not stored, e.g. BOS), and the index of ``row`` in them."""


class TensorRows:
    """A tensor or array [N, S, D] as a :class:`RowSource`.

    ``token_ids`` [N] gives tokens (for examples and the special-token share);
    ``doc_ids`` [N] marks which rows belong to one sequence, so a context window never
    crosses a document boundary (default: all rows are one sequence).
    """

    def __init__(
        self,
        acts_NSD: Tensor | np.ndarray,
        token_ids: Tensor | np.ndarray | Sequence[int] | None = None,
        doc_ids: Tensor | np.ndarray | Sequence[int] | None = None,
    ) -> None:
        if acts_NSD.ndim != 3:
            raise DataError(
                f"activations must have shape [N, S, D], got {tuple(acts_NSD.shape)}; for one "
                "source use x[:, None, :]"
            )
        self.acts = acts_NSD
        self.n_tokens, self.n_sources, self.d_model = (int(n) for n in acts_NSD.shape)
        self.token_ids = _as_index_array(token_ids, self.n_tokens, "token_ids")
        self.doc_ids = _as_index_array(doc_ids, self.n_tokens, "doc_ids")

    def read(self, start: int, stop: int) -> Tensor:
        x = self.acts[start:stop]
        x = torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else x
        return x if x.dtype == torch.float64 else x.float()

    def gather(self, index: np.ndarray) -> Tensor:
        x = self.acts[np.asarray(index, dtype=np.int64)]
        x = torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else x
        return x if x.dtype == torch.float64 else x.float()

    def tokens(self, start: int, stop: int) -> np.ndarray | None:
        return None if self.token_ids is None else self.token_ids[start:stop]

    def window(self, row: int, before: int, after: int) -> tuple[np.ndarray, np.ndarray, int]:
        lo, hi = max(0, row - before), min(self.n_tokens, row + after + 1)
        rows = np.arange(lo, hi)
        if self.doc_ids is not None:
            rows = rows[self.doc_ids[lo:hi] == self.doc_ids[row]]
        ids = self.token_ids[rows] if self.token_ids is not None else np.full(rows.size, -1)
        return ids, rows, int(np.searchsorted(rows, row))


def _as_index_array(values: Any, n: int, what: str) -> np.ndarray | None:
    if values is None:
        return None
    out = np.asarray(torch.as_tensor(values).cpu().numpy(), dtype=np.int64).reshape(-1)
    if out.size != n:
        raise DataError(f"{what} has {out.size} entries for {n} activation rows; give one per row")
    return out


class StoreRows:
    """An :class:`crosscoders.store.ActivationStore` as a :class:`RowSource`.

    Token ids and positions are read per shard through memory maps, so nothing of size N
    is held in memory.
    """

    def __init__(self, store: Any) -> None:
        self.store = store
        self.n_tokens, self.n_sources, self.d_model = (
            int(store.n_tokens),
            int(store.n_sources),
            int(store.d_model),
        )
        self._meta: dict[int, np.ndarray] = {}

    def read(self, start: int, stop: int) -> Tensor:
        return self.store.rows(start, stop)

    def gather(self, index: np.ndarray) -> Tensor:
        return self.store.gather(np.asarray(index, dtype=np.int64))

    def _shard_rows(self, shard: int) -> np.ndarray:
        from crosscoders.store import format as fmt

        if shard not in self._meta:
            index = int(self.store.shards[shard]["index"])
            self._meta[shard] = np.load(
                fmt.shard_dir(self.store.root, index) / "rows.npy", mmap_mode="r"
            )
        return self._meta[shard]

    def meta(self, start: int, stop: int) -> np.ndarray:
        """Row records (token, context, position, ...) of rows ``[start, stop)``."""
        offsets = self.store._offsets
        parts = []
        shard = int(np.searchsorted(offsets, start, side="right") - 1)
        pos = start
        while pos < stop:
            lo, hi = int(offsets[shard]), int(offsets[shard + 1])
            take = min(stop, hi)
            parts.append(np.asarray(self._shard_rows(shard)[pos - lo : take - lo]))
            pos, shard = take, shard + 1
        from crosscoders.store import format as fmt

        return np.concatenate(parts) if parts else np.empty(0, fmt.ROW_DTYPE)

    def tokens(self, start: int, stop: int) -> np.ndarray | None:
        return self.meta(start, stop)["token"].astype(np.int64)

    def positions(self, start: int, stop: int) -> np.ndarray:
        return self.meta(start, stop)["position"].astype(np.int64)

    def window(self, row: int, before: int, after: int) -> tuple[np.ndarray, np.ndarray, int]:
        rec = self.meta(row, row + 1)[0]
        ids = self.store.context_tokens(int(rec["context"])).astype(np.int64)
        pos = int(rec["position"])
        lo, hi = max(0, pos - before), min(ids.size, pos + after + 1)
        rows = np.full(hi - lo, -1, dtype=np.int64)
        # Stored rows of one context are consecutive, in position order.
        near = self.meta(max(0, row - before), min(self.n_tokens, row + after + 1))
        first = max(0, row - before)
        for k, r in enumerate(near):
            if r["context"] == rec["context"] and lo <= r["position"] < hi:
                rows[int(r["position"]) - lo] = first + k
        return ids[lo:hi], rows, pos - lo


class HeadRows:
    """The first ``n_tokens`` rows of another :class:`RowSource` (windows may look past)."""

    def __init__(self, rows: RowSource, n_tokens: int) -> None:
        self.rows = rows
        self.n_tokens = min(int(n_tokens), rows.n_tokens)
        self.n_sources, self.d_model = rows.n_sources, rows.d_model

    def read(self, start: int, stop: int) -> Tensor:
        return self.rows.read(start, min(stop, self.n_tokens))

    def gather(self, index: np.ndarray) -> Tensor:
        return self.rows.gather(index)

    def tokens(self, start: int, stop: int) -> np.ndarray | None:
        return self.rows.tokens(start, min(stop, self.n_tokens))

    def window(self, row: int, before: int, after: int) -> tuple[np.ndarray, np.ndarray, int]:
        return self.rows.window(row, before, after)


def as_rows(data: Any, token_ids: Any = None, doc_ids: Any = None) -> RowSource:
    """Wrap a tensor/array [N, S, D], an ``ActivationStore``, a store directory or a
    ``RowSource`` for reading in order."""
    if isinstance(data, (Tensor, np.ndarray)):
        return TensorRows(data, token_ids, doc_ids)
    if isinstance(data, (str, Path)):
        from crosscoders.store import ActivationStore

        return StoreRows(ActivationStore.open(data))
    if hasattr(data, "shards") and hasattr(data, "rows") and hasattr(data, "context_tokens"):
        return StoreRows(data)
    if all(hasattr(data, a) for a in ("read", "gather", "tokens", "window", "n_tokens")):
        return data
    raise DataError(
        f"cannot analyse a {type(data).__name__}: pass a tensor [N, S, D], an ActivationStore "
        "or a store directory"
    )


def check_finite(rows: RowSource, x: Tensor, start: int) -> None:
    """Refuse NaN/inf activations (they would poison every statistic and the SVDs)."""
    if bool(torch.isfinite(x).all()):
        return
    bad = int((~torch.isfinite(x.reshape(len(x), -1))).any(dim=1).nonzero()[0, 0]) + start
    inner = rows
    while isinstance(inner, HeadRows):
        inner = inner.rows
    if isinstance(inner, StoreRows):
        raise DataError(
            f"the activation store {inner.store.root} holds non-finite values (NaN or inf), "
            f"first at row {bad}; its shards are damaged or the models produced them: "
            "harvest again into a new directory (e.g. with --dtype float32)"
        )
    raise DataError(
        f"the activations hold non-finite values (NaN or inf), first at row {bad}; clean or "
        "drop those rows before the analysis"
    )


# --------------------------------------------------------------------------------------------
# One encoded batch and the pass


@dataclass
class EncodedBatch:
    """A batch of rows with its sparse latent code; ``xhat_BSD`` is decoded on first use."""

    row0: int
    x_BSD: Tensor
    codes: SparseCodes
    tokens_B: np.ndarray | None
    model: Any
    _xhat: Tensor | None = field(default=None, repr=False)

    @classmethod
    def encode(
        cls, model: Any, x_BSD: Tensor, row0: int = 0, tokens_B: np.ndarray | None = None
    ) -> EncodedBatch:
        return cls(row0, x_BSD, model.encode_sparse(x_BSD), tokens_B, model)

    @property
    def f_BF(self) -> Tensor:
        """The dense [B, F] code (built on demand; the pass itself never needs it)."""
        return self.codes.to_dense()

    @property
    def xhat_BSD(self) -> Tensor:
        if self._xhat is None:
            xhat_BX = sparse_decode(self.codes, self.model.W_dec, self.model.b_dec)
            self._xhat = xhat_BX.view(self.x_BSD.shape)
        return self._xhat


class Consumer(Protocol):
    def update(self, batch: EncodedBatch) -> None: ...


def progress_bar(total: int, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="tok", unit_scale=True, desc=desc, disable=not enabled)


@torch.inference_mode()
def analysis_pass(
    model: Any,
    data: Any,
    consumers: Iterable[Consumer],
    batch_size: int = 4096,
    start: int = 0,
    stop: int | None = None,
    progress: bool = True,
    desc: str = "diff pass",
) -> int:
    """Read rows ``[start, stop)`` once in order, encode each batch, feed every consumer.

    Returns the number of rows read. The model is used in eval mode (BatchTopK uses its
    inference threshold, so a token's code does not depend on the batch).
    """
    rows = as_rows(data)
    _check_model_data(model, rows)
    stop = rows.n_tokens if stop is None else min(stop, rows.n_tokens)
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}")
    if stop <= start:
        raise DataError(f"no rows to analyse in [{start}, {stop}); the data has {rows.n_tokens}")
    consumers = list(consumers)
    was_training = model.training
    model.eval()
    device = model.W_dec.device
    try:
        with progress_bar(stop - start, desc, progress) as bar:
            for s in range(start, stop, batch_size):
                e = min(stop, s + batch_size)
                x = rows.read(s, e).to(device=device, dtype=model.W_dec.dtype)
                check_finite(rows, x, s)
                batch = EncodedBatch.encode(model, x, s, rows.tokens(s, e))
                for consumer in consumers:
                    consumer.update(batch)
                bar.update(e - s)
    finally:
        model.train(was_training)
    return stop - start


def _check_model_data(model: Any, rows: RowSource) -> None:
    S, D = model.config.n_sources, model.config.d_model
    if (rows.n_sources, rows.d_model) != (S, D):
        raise DataError(
            f"the data has {rows.n_sources} sources of width {rows.d_model} but the crosscoder "
            f"reads {S} of width {D}; use the store the crosscoder was trained on"
        )


# --------------------------------------------------------------------------------------------
# Activation statistics


class ActivationStats:
    """Per-latent firing counts, activation sums and maxima, special-token share; FVU per
    source (pooled over tokens), L0 and dead fraction (:mod:`crosscoders.metrics`).

    ``special_ids``: token ids counted as special/template tokens (needs token ids).
    """

    def __init__(
        self, n_latents: int, n_sources: int, d_model: int, special_ids: Iterable[int] | None = None
    ) -> None:
        self.metrics = ReconstructionMetrics(n_sources, d_model, n_latents)
        self.sum_F = torch.zeros(n_latents, dtype=torch.float64)
        self.max_F = torch.zeros(n_latents, dtype=torch.float64)
        self.special_count_F = torch.zeros(n_latents, dtype=torch.int64)
        self.n_special = 0
        self.special = None if special_ids is None else np.array(sorted(set(special_ids)))
        self.has_tokens = True

    @property
    def n(self) -> int:
        return self.metrics.n_tokens

    @property
    def count_F(self) -> Tensor:
        """[F] tokens on which each latent fired."""
        return self.metrics.count_F

    def update(self, batch: EncodedBatch) -> None:
        codes = batch.codes
        F_ = self.count_F.numel()
        i_E, v_E = codes.latent_E.cpu(), codes.value_E.cpu().double()
        self.metrics.update(batch.x_BSD, batch.xhat_BSD, codes)
        self.sum_F.index_add_(0, i_E, v_E)
        self.max_F.scatter_reduce_(0, i_E, v_E, reduce="amax")
        if self.special is not None:
            if batch.tokens_B is None:
                self.has_tokens = False
                return
            is_special_B = torch.from_numpy(np.isin(batch.tokens_B, self.special))
            self.n_special += int(is_special_B.sum())
            hit_E = is_special_B[codes.token_E.cpu()]
            self.special_count_F += torch.bincount(i_E[hit_E], minlength=F_)

    def per_latent(self) -> dict[str, np.ndarray]:
        """Columns: ``n_fires`` (tokens on which the latent fired), ``freq``, ``mean_act``
        (over firing tokens), ``max_act``, ``special_share`` (share of the latent's firings
        on special tokens; NaN without token ids)."""
        count = self.count_F.double()
        fired = count > 0
        mean = torch.where(fired, self.sum_F / count.clamp_min(1), torch.zeros_like(count))
        out = {
            "n_fires": self.count_F.numpy().copy(),
            "freq": (count / max(self.n, 1)).numpy(),
            "mean_act": mean.numpy(),
            "max_act": self.max_F.numpy(),
        }
        if self.special is not None and self.has_tokens:
            share = self.special_count_F.double() / count.clamp_min(1)
            out["special_share"] = torch.where(fired, share, torch.nan).numpy()
        else:
            out["special_share"] = np.full(len(count), np.nan)
        return out

    def summary(self) -> dict[str, Any]:
        """FVU per source (pooled), L0, dead fraction, token counts."""
        result = self.metrics.result()
        return {
            "n_tokens": result.n_tokens,
            "fvu": result.fvu_S,
            "l0": result.l0,
            "dead_fraction": result.dead_fraction,
            "n_special_tokens": self.n_special if self.special is not None else None,
        }


def activation_stats(
    model: Any,
    data: Any,
    token_ids: Any = None,
    special_ids: Iterable[int] | None = None,
    batch_size: int = 4096,
    progress: bool = True,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Per-latent statistics and the reconstruction summary in one pass (see
    :class:`ActivationStats`)."""
    rows = as_rows(data, token_ids)
    stats = ActivationStats(model.dict_size, model.n_sources, model.d_model, special_ids)
    analysis_pass(model, rows, [stats], batch_size, progress=progress, desc="activation stats")
    return stats.per_latent(), stats.summary()
