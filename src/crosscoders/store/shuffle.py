"""Deterministic, bounded-memory shuffling of a long row range ("shuffle within a window").

The rows ``[0, n)`` are cut into chunks of consecutive rows. Each epoch permutes the chunks
(seeded by ``(seed, epoch)``) and groups them, in that order, into windows of
``chunks_per_window`` chunks; a window is read whole (contiguous reads per chunk) and its
rows are permuted (seeded by ``(seed, epoch, window)``). The stream of epochs is one long
sequence of row indices, so batch ``n`` of size ``B`` starts at position ``n * B`` and can be
found without touching the data before it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Window:
    """One window: the row ranges it reads and the order its rows are emitted in."""

    epoch: int
    index: int
    start: int  # position of its first row inside the epoch
    ranges: list[tuple[int, int]]  # [start, stop) row ranges, in reading order
    order: np.ndarray  # permutation of range(n_rows) of the window

    @property
    def n_rows(self) -> int:
        return int(self.order.size)


class ShufflePlan:
    """Which rows come at which position of the endless shuffled stream."""

    def __init__(self, n_rows: int, chunk_rows: int, window_rows: int, seed: int) -> None:
        if n_rows <= 0:
            raise ValueError("cannot shuffle an empty row range")
        self.n_rows = n_rows
        self.chunk_rows = max(1, min(chunk_rows, n_rows))
        self.chunks_per_window = max(1, window_rows // self.chunk_rows)
        self.seed = seed
        self.n_chunks = -(-n_rows // self.chunk_rows)

    def _windows(self, epoch: int) -> tuple[list[np.ndarray], np.ndarray]:
        """Chunk ids of each window of ``epoch`` and the windows' start positions."""
        order = np.random.default_rng([self.seed, epoch]).permutation(self.n_chunks)
        groups = [
            order[i : i + self.chunks_per_window]
            for i in range(0, order.size, self.chunks_per_window)
        ]
        sizes = np.array([sum(self._chunk_len(c) for c in g) for g in groups], dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        return groups, starts

    def _chunk_len(self, chunk: int) -> int:
        return min(self.chunk_rows, self.n_rows - chunk * self.chunk_rows)

    def window(self, epoch: int, index: int) -> Window:
        groups, starts = self._windows(epoch)
        chunks = np.sort(groups[index])  # read in file order; the row permutation mixes them
        ranges = [
            (int(c) * self.chunk_rows, int(c) * self.chunk_rows + self._chunk_len(int(c)))
            for c in chunks
        ]
        n = sum(b - a for a, b in ranges)
        order = np.random.default_rng([self.seed, epoch, index + 1]).permutation(n)
        return Window(epoch, index, int(starts[index]), ranges, order)

    def windows_from(self, position: int) -> Iterator[tuple[Window, int]]:
        """Windows from stream ``position`` on, each with the offset to start inside it."""
        epoch, offset = divmod(position, self.n_rows)
        while True:
            groups, starts = self._windows(epoch)
            first = int(np.searchsorted(starts, offset, side="right") - 1)
            for index in range(first, len(groups)):
                window = self.window(epoch, index)
                yield window, offset - window.start if index == first else 0
            epoch, offset = epoch + 1, 0
