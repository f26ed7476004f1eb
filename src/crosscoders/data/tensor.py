"""A tensor or memory-mapped array [N, S, D] as an :class:`ActivationSource`."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from functools import cached_property
from typing import Any

import numpy as np
import torch
from torch import Tensor

from crosscoders.data.checks import check_activations, check_finite, fingerprint
from crosscoders.data.shard import shard_rows
from crosscoders.errors import DataError


class TensorSource:
    """An in-memory tensor or memory-mapped array [N, S, D].

    Training: the last ``n_eval`` tokens of a fixed seeded permutation are held out. Epoch
    ``e`` is ``randperm(n_train)`` under seed ``(seed, e)``, so batch ``i`` is computable
    directly. Every row (held-out ones too) is checked for NaN/inf once, before the first
    of the trainer's reads (``describe`` comes first), so bad data is refused before a run
    starts rather than when (or if) training reaches the bad row. The in-order reads leave
    that check to their reader, which checks each batch it reads.

    ``token_ids`` [N] gives tokens (for examples and the special-token share); ``doc_ids``
    [N] marks which rows belong to one sequence, so a context window never crosses a
    document boundary (default: all rows are one sequence).
    """

    def __init__(
        self,
        acts_NSD: Tensor | np.ndarray,
        n_eval: int = 0,
        name: str = "tensor",
        token_ids: Tensor | np.ndarray | Sequence[int] | None = None,
        doc_ids: Tensor | np.ndarray | Sequence[int] | None = None,
    ) -> None:
        check_activations(acts_NSD)
        self.acts = acts_NSD
        self.name = name
        self.n_tokens, self.n_sources, self.d_model = (int(n) for n in acts_NSD.shape)
        self.n_eval = min(n_eval, self.n_tokens // 2)
        self.token_ids_N = _index_array(token_ids, self.n_tokens, "token_ids")
        self.doc_ids_N = _index_array(doc_ids, self.n_tokens, "doc_ids")
        self._checked = False

    # -- the split and the up-front check ------------------------------------------------------
    @cached_property
    def _split(self) -> tuple[Tensor, Tensor]:
        N, n_eval = self.n_tokens, self.n_eval
        order = torch.randperm(N, generator=torch.Generator().manual_seed(1234))
        eval_idx = order[N - n_eval:].sort().values if n_eval else order[:0]
        return order[: N - n_eval].sort().values, eval_idx

    @property
    def train_idx(self) -> Tensor:
        """Sorted row indices of the training split."""
        return self._split[0]

    @property
    def eval_idx(self) -> Tensor:
        """Sorted row indices of the held-out split."""
        return self._split[1]

    @property
    def n_train(self) -> int:
        return len(self.train_idx)

    def _check(self) -> None:
        """The whole-data NaN/inf check, once, before the trainer reads anything."""
        if not self._checked:
            check_finite(self.acts, "the activation tensor" if self.name == "tensor"
                         else self.name)
            self._checked = True

    def _take(self, idx: Tensor) -> Tensor:
        if isinstance(self.acts, Tensor):
            out = self.acts[idx]
        else:  # numpy memmap: sorted reads are much faster from disk
            out = torch.from_numpy(np.ascontiguousarray(self.acts[np.sort(idx.numpy())]))
        return _float(out)

    def _epoch_perm(self, seed: int, epoch: int) -> Tensor:
        gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        return self.train_idx[torch.randperm(self.n_train, generator=gen)]

    # -- the trainer's reads -----------------------------------------------------------------
    def batches(self, batch_size: int, seed: int, start: int = 0,
                shard: tuple[int, int] | None = None) -> Iterator[Tensor]:
        self._check()
        lo, hi = shard_rows(batch_size, shard)
        return self._batches(batch_size, seed, start, lo, hi)

    def _batches(self, batch_size: int, seed: int, start: int, lo: int,
                 hi: int) -> Iterator[Tensor]:
        n = self.n_train
        epoch, offset = divmod(start * batch_size, n)
        perm = self._epoch_perm(seed, epoch)
        while True:
            parts, need = [], batch_size
            while need:
                take = perm[offset: offset + need]
                parts.append(take)
                need -= len(take)
                offset += len(take)
                if offset >= n:
                    epoch, offset = epoch + 1, 0
                    perm = self._epoch_perm(seed, epoch)
            yield self._take(torch.cat(parts)[lo:hi])  # only this rank's rows are read

    def eval_batches(self, batch_size: int) -> Iterator[Tensor]:
        self._check()
        return (self._take(self.eval_idx[i: i + batch_size])
                for i in range(0, len(self.eval_idx), batch_size))

    def sample(self, n_tokens: int, seed: int) -> Tensor:
        self._check()
        gen = torch.Generator().manual_seed(seed)
        pick = torch.randperm(self.n_train, generator=gen)[:n_tokens]
        return self._take(self.train_idx[pick])

    def mean_squared_norm(self) -> Tensor | None:
        self._check()
        return None

    @cached_property
    def fingerprint(self) -> str:
        return fingerprint(self.acts)

    def describe(self) -> dict:
        self._check()
        return {"kind": "tensor", "name": self.name, "n_tokens": self.n_tokens,
                "n_sources": self.n_sources, "d_model": self.d_model,
                "fingerprint": self.fingerprint}

    # -- the analysis's reads ----------------------------------------------------------------
    def rows(self, start: int, stop: int) -> Tensor:
        x = self.acts[start:stop]
        return _float(torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray)
                      else x)

    def gather(self, index: np.ndarray) -> Tensor:
        x = self.acts[np.asarray(index, dtype=np.int64)]
        return _float(torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray)
                      else x)

    def token_ids(self, start: int, stop: int) -> np.ndarray | None:
        return None if self.token_ids_N is None else self.token_ids_N[start:stop]

    def positions(self, start: int, stop: int) -> np.ndarray | None:
        return None

    def window(self, row: int, before: int, after: int) -> tuple[np.ndarray, np.ndarray, int]:
        lo, hi = max(0, row - before), min(self.n_tokens, row + after + 1)
        rows = np.arange(lo, hi)
        if self.doc_ids_N is not None:
            rows = rows[self.doc_ids_N[lo:hi] == self.doc_ids_N[row]]
        ids = (self.token_ids_N[rows] if self.token_ids_N is not None
               else np.full(rows.size, -1, dtype=np.int64))
        return ids, rows, int(np.searchsorted(rows, row))


def _float(x: Tensor) -> Tensor:
    """Float rows: float64 stays, anything else becomes float32."""
    return x if x.dtype == torch.float64 else x.float()


def _index_array(values: Any, n: int, what: str) -> np.ndarray | None:
    """``values`` as [n] int64, or None."""
    if values is None:
        return None
    out = np.asarray(torch.as_tensor(values).cpu().numpy(), dtype=np.int64).reshape(-1)
    if out.size != n:
        raise DataError(f"{what} has {out.size} entries for {n} activation rows; give one per row")
    return out
