"""Where training activations come from: tensors, files, stores and iterables.

Everything the trainer reads implements :class:`ActivationSource`. Sources are
deterministic given a seed and can start at any batch number, which is how a resumed
run continues on exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor

from crosscoders.errors import DataError


@runtime_checkable
class ActivationSource(Protocol):
    n_sources: int
    d_model: int

    def batches(self, batch_size: int, seed: int, start: int = 0) -> Iterator[Tensor]:
        """Endless shuffled float batches [B, S, D]; batch number ``start`` first."""

    def eval_batches(self, batch_size: int) -> Iterator[Tensor]:
        """The held-out split, in order (finite, maybe empty)."""

    def sample(self, n_tokens: int, seed: int) -> Tensor:
        """About ``n_tokens`` random training tokens [n, S, D]."""

    def mean_squared_norm(self) -> Tensor | None:
        """[S] mean ||x_s||^2 over training tokens if known without a pass, else None."""

    def describe(self) -> dict:
        """JSON-able identity of the data, used to refuse resuming on other data."""


def check_activations(x: Tensor | np.ndarray, what: str = "activations") -> None:
    """Shape and finiteness checks with errors that say what to change."""
    if x.ndim != 3:
        raise DataError(
            f"{what} must have shape [N, S, D] (tokens, sources, d_model), got shape "
            f"{tuple(x.shape)}; for a single source use x[:, None, :]"
        )
    if x.shape[0] == 0:
        raise DataError(f"{what} are empty (0 tokens); harvest or pass some data first")
    dtype = str(x.dtype)
    if "float" not in dtype and "bfloat" not in dtype:
        raise DataError(f"{what} must be floating point, got dtype {dtype}")


def _check_finite(x: Tensor, what: str) -> None:
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).any(dim=(1, 2)).sum())
        raise DataError(
            f"{what} contain NaN or inf values in {bad} token(s); clean or drop those tokens "
            "before training"
        )


class TensorSource:
    """An in-memory tensor or memory-mapped array [N, S, D], shuffled by epoch.

    The last ``n_eval`` tokens of a fixed seeded permutation are held out. Epoch ``e`` is
    ``randperm(n_train)`` under seed ``(seed, e)``, so batch ``i`` is computable directly.
    """

    def __init__(self, acts_NSD: Tensor | np.ndarray, n_eval: int = 0, name: str = "tensor"):
        check_activations(acts_NSD)
        self.acts = acts_NSD
        self.name = name
        N = acts_NSD.shape[0]
        self.n_sources, self.d_model = int(acts_NSD.shape[1]), int(acts_NSD.shape[2])
        n_eval = min(n_eval, N // 2)
        order = torch.randperm(N, generator=torch.Generator().manual_seed(1234))
        self.eval_idx = order[N - n_eval:].sort().values if n_eval else order[:0]
        self.train_idx = order[: N - n_eval].sort().values
        self._checked_finite = False

    @property
    def n_train(self) -> int:
        return len(self.train_idx)

    def _rows(self, idx: Tensor) -> Tensor:
        if isinstance(self.acts, Tensor):
            out = self.acts[idx]
        else:  # numpy memmap: sorted reads are much faster from disk
            out = torch.from_numpy(np.ascontiguousarray(self.acts[np.sort(idx.numpy())]))
        out = out.float() if out.dtype != torch.float64 else out
        _check_finite(out, "activations")
        return out

    def _epoch_perm(self, seed: int, epoch: int) -> Tensor:
        gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        return self.train_idx[torch.randperm(self.n_train, generator=gen)]

    def batches(self, batch_size: int, seed: int, start: int = 0) -> Iterator[Tensor]:
        n = self.n_train
        pos = start * batch_size
        epoch, offset = divmod(pos, n)
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
            yield self._rows(torch.cat(parts))

    def eval_batches(self, batch_size: int) -> Iterator[Tensor]:
        for i in range(0, len(self.eval_idx), batch_size):
            yield self._rows(self.eval_idx[i: i + batch_size])

    def sample(self, n_tokens: int, seed: int) -> Tensor:
        gen = torch.Generator().manual_seed(seed)
        pick = torch.randperm(self.n_train, generator=gen)[:n_tokens]
        return self._rows(self.train_idx[pick])

    def mean_squared_norm(self) -> Tensor | None:
        return None

    def describe(self) -> dict:
        return {"kind": "tensor", "name": self.name, "n_tokens": int(self.acts.shape[0]),
                "n_sources": self.n_sources, "d_model": self.d_model}


class IterableSource:
    """User-supplied batches [B, S, D]. The first ``n_eval_batches`` are held out.

    Resuming skips (reads and discards) the batches already trained on, so the iterable
    must yield the same sequence when iterated again. Batch size is the iterable's own.
    """

    def __init__(self, batches: Iterable[Tensor], n_eval_batches: int = 0):
        self.iterable = batches
        iterator = iter(batches)
        first = next(iterator, None)
        if first is None:
            raise DataError("the batch iterable is empty; it must yield [B, S, D] tensors")
        check_activations(first, "batches")
        self.n_sources, self.d_model = int(first.shape[1]), int(first.shape[2])
        self.n_eval_batches = n_eval_batches

    def _iter(self) -> Iterator[Tensor]:
        for batch in self.iterable:
            batch = torch.as_tensor(batch)
            check_activations(batch, "batches")
            if tuple(batch.shape[1:]) != (self.n_sources, self.d_model):
                raise DataError(
                    f"batch of shape {tuple(batch.shape)} does not match the first batch "
                    f"[B, {self.n_sources}, {self.d_model}]"
                )
            _check_finite(batch, "batches")
            yield batch.float()

    def batches(self, batch_size: int, seed: int, start: int = 0) -> Iterator[Tensor]:
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

    def mean_squared_norm(self) -> Tensor | None:
        return None

    def describe(self) -> dict:
        return {"kind": "iterable", "n_sources": self.n_sources, "d_model": self.d_model}


def load_activation_file(path: str | Path) -> Tensor | np.ndarray:
    """Read a float tensor [N, S, D] from ``.safetensors`` (one tensor), ``.pt`` or ``.npy``.

    A missing, damaged or foreign file raises :class:`DataError` saying how to fix it.
    """
    from crosscoders.io import read_npy, read_safetensors, read_torch

    path = Path(path)
    if not path.exists():
        raise DataError(
            f"data file {path} does not exist; check the path, or give an activation-store "
            "directory or a .safetensors/.pt/.npy file holding a float tensor [N, S, D]"
        )
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return read_npy(path)
    if suffix == ".pt":
        obj = read_torch(path)
        if isinstance(obj, dict):
            obj = _single_tensor(obj, path)
        if not isinstance(obj, Tensor):
            raise DataError(
                f"{path} holds a {type(obj).__name__}, not a tensor [N, S, D]; save the "
                "activations themselves: torch.save(acts_NSD, path)"
            )
        return obj
    if suffix == ".safetensors":
        return _single_tensor(read_safetensors(path), path)
    raise DataError(
        f"unsupported data file {path.name}: use .safetensors, .pt or .npy holding a float "
        "tensor [N, S, D], or an activation-store directory"
    )


def _single_tensor(tensors: dict, path: Path) -> Tensor:
    if len(tensors) == 1:
        return next(iter(tensors.values()))
    if "activations" in tensors:
        return tensors["activations"]
    raise DataError(
        f"{path} holds {len(tensors)} tensors ({', '.join(list(tensors)[:5])}); store one "
        "tensor [N, S, D], or name it 'activations'"
    )


def as_source(data, n_eval: int = 0, batch_size: int = 1) -> ActivationSource:
    """Turn a tensor, array, file path, store directory or iterable into a source."""
    if isinstance(data, (Tensor, np.ndarray)):
        return TensorSource(data, n_eval)
    if isinstance(data, (str, Path)):
        path = Path(data)
        if path.is_dir():
            from crosscoders.store import ActivationStore

            return ActivationStore.open(path)
        return TensorSource(load_activation_file(path), n_eval, name=str(path))
    if isinstance(data, ActivationSource):
        return data
    if isinstance(data, Iterable):
        return IterableSource(data, max(0, -(-n_eval // max(batch_size, 1))) if n_eval else 0)
    raise DataError(
        f"cannot train on a {type(data).__name__}: pass a tensor [N, S, D], a .safetensors/"
        ".pt/.npy file, an activation-store directory, or an iterable of [B, S, D] batches"
    )
