"""Reading a source's rows in order: the analysis's batches, a stream's cursor, a head."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch import Tensor

from crosscoders.data.protocol import ActivationSource
from crosscoders.errors import DataError


def ordered_stop(source: ActivationSource, stop: int | None) -> int | None:
    """The end of an in-order read asking for rows up to ``stop`` (None: all): ``stop``
    capped at the source's length, or None when neither is known (read to the end)."""
    if source.n_tokens is None:
        return stop
    return source.n_tokens if stop is None else min(stop, source.n_tokens)


def ordered_batches(source: ActivationSource, batch_size: int, start: int = 0,
                    stop: int | None = None) -> Iterator[tuple[int, Tensor]]:
    """``(first row, rows [b, S, D])`` of rows ``[start, stop)`` in batches of ``batch_size``;
    on a source of unknown length, until its rows run out."""
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}")
    stop = ordered_stop(source, stop)
    s = start
    while stop is None or s < stop:
        e = s + batch_size if stop is None else min(stop, s + batch_size)
        x = source.rows(s, e)
        if x.shape[0]:
            yield s, x
        if x.shape[0] < e - s:  # the source ended
            return
        s = e


class StreamCursor:
    """Rows ``[start, stop)`` of a stream of row blocks that can only be read in order.

    A read that starts where the last one stopped continues the stream, so reading it in
    order costs one pass; a read that starts earlier reopens it.
    """

    def __init__(self, open_stream: Callable[[], Iterator[Tensor]], n_sources: int,
                 d_model: int) -> None:
        self.open_stream = open_stream
        self.n_sources, self.d_model = n_sources, d_model
        self.stream: Iterator[Tensor] | None = None
        self.position = 0  # stream row of pending[0]
        self.pending = torch.empty(0, n_sources, d_model)

    def _next(self) -> bool:
        """Move on to the stream's next block; False at its end."""
        assert self.stream is not None
        self.position += self.pending.shape[0]
        block = next(self.stream, None)
        if block is None:
            self.pending = self.pending[:0]
            return False
        self.pending = block
        return True

    def read(self, start: int, stop: int) -> Tensor:
        if self.stream is None or start < self.position:
            self.stream, self.position = self.open_stream(), 0
            self.pending = torch.empty(0, self.n_sources, self.d_model)
        while self.position + self.pending.shape[0] <= start:
            if not self._next():
                return self.pending[:0]
        parts, row = [], start
        while row < stop:
            lo = row - self.position
            if lo >= self.pending.shape[0]:
                if not self._next():
                    break
                continue
            take = self.pending[lo: lo + stop - row]
            parts.append(take)
            row += take.shape[0]
        if not parts:
            return self.pending[:0]
        return parts[0] if len(parts) == 1 else torch.cat(parts)


class Head(ActivationSource):
    """The first ``n_tokens`` rows of another source, for the in-order analysis.

    Ordered reads stop at ``n_tokens``; ``gather`` and ``window`` reach the whole source
    (a context window may look past the last row). Not for training: train on the whole
    source, or on a slice of the tensor.
    """

    def __init__(self, source: ActivationSource, n_tokens: int) -> None:
        self.source = source
        self.limit = int(n_tokens)
        self.n_tokens = None if source.n_tokens is None else min(self.limit, source.n_tokens)
        self.n_sources, self.d_model = source.n_sources, source.d_model

    def _not_for_training(self) -> DataError:
        return DataError(f"the first {self.limit} rows of a source are read for the analysis "
                         "only; train on the whole source, or on a slice of the tensor")

    def batches(self, batch_size: int, seed: int, start: int = 0,
                shard: tuple[int, int] | None = None) -> Iterator[Tensor]:
        raise self._not_for_training()

    def eval_batches(self, batch_size: int) -> Iterator[Tensor]:
        raise self._not_for_training()

    def sample(self, n_tokens: int, seed: int) -> Tensor:
        raise self._not_for_training()

    def describe(self) -> dict:
        return {**self.source.describe(), "head": self.limit}

    def rows(self, start: int, stop: int) -> Tensor:
        return self.source.rows(start, max(start, min(stop, self.limit)))

    def gather(self, index: np.ndarray) -> Tensor:
        return self.source.gather(index)

    def token_ids(self, start: int, stop: int) -> np.ndarray | None:
        return self.source.token_ids(start, max(start, min(stop, self.limit)))

    def positions(self, start: int, stop: int) -> np.ndarray | None:
        return self.source.positions(start, max(start, min(stop, self.limit)))

    def window(self, row: int, before: int, after: int) -> tuple[np.ndarray, np.ndarray, int]:
        return self.source.window(row, before, after)
