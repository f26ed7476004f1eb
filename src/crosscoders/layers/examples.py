"""Max-activating contexts of a cross-layer crosscoder's latents, overall and per layer.

A latent of a crosscoder over several layers has one activation per token, computed from
every layer it reads: ``pre_F = sum_s x_s @ W_enc[s] + b_enc``. Besides the contexts of its
highest activations (``kind = "top"``), :class:`LayerExampleCollector` keeps, for each
layer ``s``, the contexts where that layer's term ``x_s . W_enc[s, :, i]`` is largest
(``kind = "layer:<s>"``, ``value`` = the term): which inputs drive the latent through that
layer. A latent that reads one layer only (weakly causal: its home layer) gets contexts for
that layer only, since the other terms are zero.

The bookkeeping is :class:`crosscoders.diff.examples.ExampleCollector`'s (a streaming top
``n`` per group; context windows read afterwards by ``finish``), so the records save with
:func:`crosscoders.diff.examples.save_examples` like the diff step's.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from crosscoders.diff.examples import ExampleCollector, TopPerGroup
from crosscoders.diff.stats import EncodedBatch
from crosscoders.model import Crosscoder

#: the ``kind`` of the contexts kept for layer (source) ``s``
LAYER_KIND = "layer:{}"
#: elements of x and W_enc gathered at once when computing per-layer terms (~16 MB each)
_CHUNK_ELEMENTS = 1 << 22


def layer_kind(s: int) -> str:
    return LAYER_KIND.format(s)


def layer_of_kind(kind: str) -> int | None:
    """The layer index of a ``layer:<s>`` kind, None for any other kind."""
    prefix = LAYER_KIND.format("")
    return int(kind[len(prefix):]) if kind.startswith(prefix) else None


class LayerExampleCollector(ExampleCollector):
    """Analysis-pass consumer: the ``n_top`` strongest activations of each of ``latents``
    and, per layer, the ``n_layer`` (default ``n_top``) largest positive input terms."""

    def __init__(self, model: Crosscoder, latents: Any, n_top: int = 10,
                 n_layer: int | None = None, buffer: int = 1 << 18) -> None:
        super().__init__(model.dict_size, latents, n_top=n_top, n_samples=0, buffer=buffer)
        self.n_sources = int(model.n_sources)
        self.W_enc_FSD = model.W_enc_FSD.detach()
        n_layer = n_top if n_layer is None else n_layer
        groups = len(self.latents) * self.n_sources
        self.by_layer = (TopPerGroup(groups, n_layer, max(buffer, 4 * groups * n_layer))
                         if n_layer > 0 and groups else None)

    def update(self, batch: EncodedBatch) -> None:
        super().update(batch)
        if self.by_layer is None:
            return
        latent_E, token_E = batch.codes.latent_E, batch.codes.token_E
        pos_E = self.pos_F.to(latent_E.device)[latent_E]
        kept = (pos_E >= 0).nonzero().squeeze(1)
        S, D = self.n_sources, batch.x_BSD.shape[-1]
        layer_S = torch.arange(S, device=latent_E.device)
        for chunk in kept.split(max(1, _CHUNK_ELEMENTS // (S * D))):
            x_ESD = batch.x_BSD[token_E[chunk]].to(self.W_enc_FSD.dtype)
            term_ES = (x_ESD * self.W_enc_FSD[latent_E[chunk]]).sum(-1)
            g_ES = pos_E[chunk, None] * S + layer_S
            row_ES = (token_E[chunk] + batch.row0)[:, None].expand(-1, S)
            positive = term_ES > 0  # a layer that pushes the latent down does not drive it
            score = term_ES[positive].double().cpu()
            self.by_layer.add(g_ES[positive].cpu(), score, score, row_ES[positive].cpu())

    def records(self, latents: Any = None) -> list[dict[str, Any]]:
        """The top records (see ``ExampleCollector.records``), then per layer: latent,
        ``kind`` ``layer:<s>``, rank, value (the layer's input term), row."""
        out = super().records(latents)
        if self.by_layer is None:
            return out
        wanted = None if latents is None else {int(i) for i in np.asarray(latents).ravel()}
        g, _, value, row = self.by_layer.compact()
        counts = torch.bincount(g, minlength=len(self.latents) * self.n_sources)
        start = torch.cumsum(counts, 0) - counts
        rank = torch.arange(len(g)) - start[g]
        for gi, vi, ri, k in zip(g.tolist(), value.tolist(), row.tolist(), rank.tolist()):
            latent = int(self.latents[gi // self.n_sources])
            if wanted is not None and latent not in wanted:
                continue
            out.append({"latent": latent, "kind": layer_kind(gi % self.n_sources), "rank": k,
                        "value": vi, "quantile": None, "row": ri})
        return out


def choose_latents(peak_F: np.ndarray, counted_F: np.ndarray, freq_F: np.ndarray,
                   n: int) -> np.ndarray:
    """Up to ``n`` counted latents for the report's cards: the most frequently firing of
    each peak layer in turn, so that every layer is represented."""
    idx = np.flatnonzero(np.asarray(counted_F, bool))
    if n <= 0 or idx.size == 0:
        return np.empty(0, np.int64)
    peak, freq = np.asarray(peak_F)[idx], np.asarray(freq_F)[idx]
    order = np.lexsort((idx, -freq, peak))  # by peak layer, then most frequent first
    peak_sorted = peak[order]
    first_of_peak = np.searchsorted(peak_sorted, peak_sorted, side="left")
    rank = np.arange(order.size) - first_of_peak  # position within the peak layer
    chosen = order[np.lexsort((peak_sorted, rank))][:n]  # round robin over the layers
    return np.sort(idx[chosen])
