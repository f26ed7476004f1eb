"""User-supplied batches [B, S, D] as an :class:`ActivationSource`."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator

import torch
from torch import Tensor

from crosscoders.data.checks import check_activations, check_batch_finite
from crosscoders.data.ordered import StreamCursor
from crosscoders.data.protocol import ActivationSource
from crosscoders.data.shard import cut_batches
from crosscoders.errors import DataError


class IterableSource(ActivationSource):
    """User-supplied batches [B, S, D]. The first ``n_eval_batches`` are held out.

    Resuming skips (reads and discards) the batches already trained on, so the iterable
    must yield the same sequence when iterated again. Batch size is the iterable's own.
    In order, its rows are its batches one after the other (held-out ones first); their
    number is unknown until read (``n_tokens`` is None), and there is no random access.
    """

    def __init__(self, batches: Iterable[Tensor], n_eval_batches: int = 0):
        self.iterable = batches
        iterator = iter(batches)
        first = next(iterator, None)
        if first is None:
            raise DataError("the batch iterable is empty; it must yield [B, S, D] tensors")
        check_activations(first, "batches")
        self.n_sources, self.d_model = int(first.shape[1]), int(first.shape[2])
        self.n_tokens = None
        self.n_eval_batches = n_eval_batches
        self.cursor = StreamCursor(lambda: self._iter(check_finite=False), self.n_sources,
                                   self.d_model)

    def _iter(self, check_finite: bool = True) -> Iterator[Tensor]:
        """The batches, shape-checked (and NaN/inf-checked unless the reader checks them)."""
        for batch in self.iterable:
            batch = torch.as_tensor(batch)
            check_activations(batch, "batches")
            if tuple(batch.shape[1:]) != (self.n_sources, self.d_model):
                raise DataError(
                    f"batch of shape {tuple(batch.shape)} does not match the first batch "
                    f"[B, {self.n_sources}, {self.d_model}]"
                )
            if check_finite:
                check_batch_finite(batch, "batches")
            yield batch.float()

    # -- the trainer's reads -----------------------------------------------------------------
    def batches(self, batch_size: int, seed: int, start: int = 0,
                shard: tuple[int, int] | None = None) -> Iterator[Tensor]:
        """The iterable's batches (each cut to the rank's rows with ``shard``)."""
        if shard is not None:
            yield from cut_batches(self.batches(batch_size, seed, start), shard)
            return
        while True:
            produced = False
            for batch in itertools.islice(self._iter(), self.n_eval_batches + start, None):
                produced = True
                yield batch
            start = 0
            if not produced:
                raise DataError("the batch iterable yielded no training batches")

    def eval_batches(self, batch_size: int) -> Iterator[Tensor]:
        return itertools.islice(self._iter(), self.n_eval_batches)

    def sample(self, n_tokens: int, seed: int) -> Tensor:
        got, parts = 0, []
        for batch in itertools.islice(self._iter(), self.n_eval_batches, None):
            parts.append(batch)
            got += len(batch)
            if got >= n_tokens:
                break
        if not parts:
            raise DataError("the batch iterable yielded no training batches")
        return torch.cat(parts)[:n_tokens]

    def describe(self) -> dict:
        return {"kind": "iterable", "n_sources": self.n_sources, "d_model": self.d_model}

    # -- the analysis's reads ----------------------------------------------------------------
    def rows(self, start: int, stop: int) -> Tensor:
        """Rows ``[start, stop)`` of the batches one after the other (fewer at the end)."""
        return self.cursor.read(start, stop)
