"""The one way activations are read: :class:`ActivationSource`.

The trainer reads shuffled batches from a source; the analysis (the diff pass, layer
profiles, context windows for explanations) reads its rows in order and by index. Every
kind of data implements both halves: a tensor, array or file (``TensorSource``), an
:class:`~crosscoders.store.ActivationStore`, an iterable of batches (``IterableSource``)
and the streaming harvest. A source that cannot do something says so with a
:class:`~crosscoders.errors.DataError` naming the fix, never silently.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol, runtime_checkable

import numpy as np
from torch import Tensor

from crosscoders.errors import DataError

#: what to do with data that can only be read in order (one place, so every refusal agrees)
RANDOM_ACCESS_FIX = ("harvest it to an activation store first (crosscoders harvest), or pass "
                     "a tensor [N, S, D]")


@runtime_checkable
class ActivationSource(Protocol):
    """Activations [N, S, D]: shuffled batches for the trainer, rows in order for analysis.

    Sources are deterministic given a seed and can start at any batch number, which is how
    a resumed run continues on exactly the batches an uninterrupted run would have seen.

    Rows are numbered in the data's own order (a store's harvest order, a tensor's rows,
    an iterable's batches one after the other), held-out rows included.

    Optional capabilities: ``token_ids``, ``positions`` and ``mean_squared_norm`` return
    None when the source does not know them; ``gather`` and ``window`` need random access
    and raise :class:`DataError` on a source read in order only. ``n_tokens`` is None when
    the length is unknown before reading everything (an iterable, the streaming harvest);
    ``rows`` then returns fewer rows than asked at the end. Subclass this protocol to
    inherit those defaults.
    """

    n_sources: int
    d_model: int
    n_tokens: int | None = None

    # -- the trainer's reads -----------------------------------------------------------------
    def batches(self, batch_size: int, seed: int, start: int = 0,
                shard: tuple[int, int] | None = None) -> Iterator[Tensor]:
        """Endless shuffled float batches [B, S, D]; batch number ``start`` first.

        ``shard=(rank, world)``: only rows ``[rank * B / world, (rank + 1) * B / world)`` of
        every batch (see :func:`crosscoders.data.shard_rows`); a source that can reads no
        other rows.
        """
        ...

    def eval_batches(self, batch_size: int) -> Iterator[Tensor]:
        """The held-out split, in order (finite, maybe empty)."""
        ...

    def sample(self, n_tokens: int, seed: int) -> Tensor:
        """About ``n_tokens`` random training tokens [n, S, D]."""
        ...

    def mean_squared_norm(self) -> Tensor | None:
        """[S] mean ||x_s||^2 over training tokens if known without a pass, else None."""
        return None

    def describe(self) -> dict:
        """JSON-able identity of the data, used to refuse resuming on other data."""
        ...

    # -- the analysis's reads ----------------------------------------------------------------
    def rows(self, start: int, stop: int) -> Tensor:
        """Rows ``[start, stop)`` in order as float [n, S, D] (float64 data stays float64)."""
        raise DataError(f"{type(self).__name__} cannot read its rows in order; "
                        f"{RANDOM_ACCESS_FIX}")

    def gather(self, index: np.ndarray) -> Tensor:
        """Rows at ``index`` (any order) as float [n, S, D]."""
        raise DataError(f"{type(self).__name__} reads its rows in order only, so it cannot "
                        f"gather rows by index; {RANDOM_ACCESS_FIX}")

    def token_ids(self, start: int, stop: int) -> np.ndarray | None:
        """Token id of rows ``[start, stop)`` ([n] int64), or None if unknown."""
        return None

    def positions(self, start: int, stop: int) -> np.ndarray | None:
        """Position of rows ``[start, stop)`` in their model input ([n] int64), or None."""
        return None

    def window(self, row: int, before: int, after: int) -> tuple[np.ndarray, np.ndarray, int]:
        """Token ids around ``row`` in its context ([w] int64, -1 if unknown), the row index
        of each ([w] int64, -1 where the position was not stored, e.g. BOS), and the index
        of ``row`` in them."""
        raise DataError(f"{type(self).__name__} reads its rows in order only, so it has no "
                        f"context windows; {RANDOM_ACCESS_FIX}")
