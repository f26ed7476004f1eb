"""One streaming pass over activations: encode once, feed every per-latent statistic.

The analysis reads its data through :class:`~crosscoders.data.ActivationSource` (a tensor
[N, S, D] with optional token ids, an activation store, ...), in order, one batch at a
time. :func:`analysis_pass` encodes each batch once and hands an :class:`EncodedBatch` to
every consumer (:class:`ActivationStats` here, Latent Scaling, max-activating examples), so
all of them share one read of the data and one encoder GEMM. Consumers keep state whose size depends
on the number of latents, never on the number of tokens.

The latent code of a batch is kept sparse (:class:`~crosscoders.model.sparse.SparseCodes`:
row, latent and value of the E non-zero entries), so the bookkeeping costs O(E) instead of
O(B * F), and the reconstruction is decoded from the active set only (cost E * S * D).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
from torch import Tensor

from crosscoders.data import (
    ActivationData,
    ActivationSource,
    Head,
    as_source,
    ordered_batches,
    ordered_stop,
)
from crosscoders.diff.schema import Summary
from crosscoders.errors import DataError
from crosscoders.metrics import ReconstructionMetrics
from crosscoders.model.sparse import SparseCodes, sparse_decode
from crosscoders.store import ActivationStore

if TYPE_CHECKING:
    from crosscoders.model import Crosscoder

# --------------------------------------------------------------------------------------------
# Checks on what the pass reads


def check_rows_finite(source: ActivationSource, x: Tensor, start: int) -> None:
    """Refuse NaN/inf activations (they would poison every statistic and the SVDs)."""
    if bool(torch.isfinite(x).all()):
        return
    bad = int((~torch.isfinite(x.reshape(len(x), -1))).any(dim=1).nonzero()[0, 0]) + start
    inner = source
    while isinstance(inner, Head):
        inner = inner.source
    if isinstance(inner, ActivationStore):
        raise DataError(
            f"the activation store {inner.root} holds non-finite values (NaN or inf), "
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
    model: Crosscoder
    _xhat: Tensor | None = field(default=None, repr=False)

    @classmethod
    def encode(
        cls, model: Crosscoder, x_BSD: Tensor, row0: int = 0, tokens_B: np.ndarray | None = None
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


def progress_bar(total: int | None, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="tok", unit_scale=True, desc=desc, disable=not enabled)


@torch.inference_mode()
def analysis_pass(
    model: Crosscoder,
    data: ActivationData,
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
    source = as_source(data)
    check_model_data(model, source)
    stop = ordered_stop(source, stop)  # ordered_batches checks batch_size
    if stop is not None and stop <= start:
        raise DataError(f"no rows to analyse in [{start}, {stop}); the data has "
                        f"{source.n_tokens}")
    consumers = list(consumers)
    was_training = model.training
    model.eval()
    device = model.W_dec.device
    read = 0
    try:
        with progress_bar(None if stop is None else stop - start, desc, progress) as bar:
            for s, x in ordered_batches(source, batch_size, start, stop):
                e = s + len(x)
                x = x.to(device=device, dtype=model.W_dec.dtype)
                check_rows_finite(source, x, s)
                batch = EncodedBatch.encode(model, x, s, source.token_ids(s, e))
                for consumer in consumers:
                    consumer.update(batch)
                bar.update(e - s)
                read += e - s
    finally:
        model.train(was_training)
    if not read:
        raise DataError(f"no rows to analyse from row {start}: the data ended before it")
    return read


def check_model_data(model: Crosscoder, source: ActivationSource) -> None:
    """Refuse data whose shape is not the crosscoder's."""
    S, D = model.config.n_sources, model.config.d_model
    if (source.n_sources, source.d_model) != (S, D):
        raise DataError(
            f"the data has {source.n_sources} sources of width {source.d_model} but the crosscoder "
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
            Summary.FVU: result.fvu_S,
            Summary.L0: result.l0,
            Summary.DEAD_FRACTION: result.dead_fraction,
            "n_special_tokens": self.n_special if self.special is not None else None,
        }


def activation_stats(
    model: Crosscoder,
    data: ActivationData,
    token_ids: Any = None,
    special_ids: Iterable[int] | None = None,
    batch_size: int = 4096,
    progress: bool = True,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Per-latent statistics and the reconstruction summary in one pass (see
    :class:`ActivationStats`)."""
    source = as_source(data, token_ids=token_ids)
    stats = ActivationStats(model.dict_size, model.n_sources, model.d_model, special_ids)
    analysis_pass(model, source, [stats], batch_size, progress=progress, desc="activation stats")
    return stats.per_latent(), stats.summary()
