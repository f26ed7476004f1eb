"""Where training activations come from: tensors, files, stores and iterables.

Everything the trainer reads implements :class:`ActivationSource`. Sources are
deterministic given a seed and can start at any batch number, which is how a resumed
run continues on exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import hashlib
import inspect
import itertools
from collections.abc import Iterable, Iterator
from functools import cached_property
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

    def batches(self, batch_size: int, seed: int, start: int = 0,
                shard: tuple[int, int] | None = None) -> Iterator[Tensor]:
        """Endless shuffled float batches [B, S, D]; batch number ``start`` first.

        ``shard=(rank, world)``: only rows ``[rank * B / world, (rank + 1) * B / world)`` of
        every batch (see :func:`shard_rows`); a source that can reads no other rows.
        """

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
        raise DataError(f"{what} must be floating point, got dtype {dtype}; convert them "
                        "first (x.float() for a tensor, arr.astype('float32') for an array)")


def shard_rows(batch_size: int, shard: tuple[int, int] | None) -> tuple[int, int]:
    """Rows ``[lo, hi)`` of a batch that rank ``shard[0]`` of ``shard[1]`` trains on.

    The global batch is the same rows a single process reads; rank r takes the r-th of
    ``world`` equal consecutive slices of it.
    """
    if shard is None:
        return 0, batch_size
    rank, world = shard
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside a world of {world}")
    if batch_size % world:
        raise DataError(
            f"a batch of {batch_size} rows cannot be split evenly over {world} data-parallel "
            f"processes; use a batch size divisible by {world} (e.g. "
            f"{max(world, batch_size // world * world)}) or another number of processes"
        )
    part = batch_size // world
    return rank * part, (rank + 1) * part


def sharded_batches(source: ActivationSource, batch_size: int, seed: int, start: int = 0,
                    shard: tuple[int, int] | None = None) -> Iterator[Tensor]:
    """``source.batches`` for one rank: the source's own sharded reads where it has them
    (a ``shard`` parameter), else its whole batches cut down to the rank's rows."""
    if shard is None or shard[1] == 1:
        return source.batches(batch_size, seed, start=start)
    shard_rows(batch_size, shard)  # refuse an uneven split before reading anything
    if "shard" in inspect.signature(source.batches).parameters:
        return source.batches(batch_size, seed, start=start, shard=shard)
    return _cut(source.batches(batch_size, seed, start=start), shard)


def _cut(batches: Iterator[Tensor], shard: tuple[int, int]) -> Iterator[Tensor]:
    for batch in batches:
        lo, hi = shard_rows(batch.shape[0], shard)
        yield batch[lo:hi]


_CHECK_BYTES = 64 << 20  # rows checked together by the finiteness pass
FINGERPRINT_ROWS = 64


def _nonfinite_mask(x: Tensor | np.ndarray) -> np.ndarray | None:
    """Boolean [n, ...] mask of the NaN/inf entries of ``x``, or None if there are none.

    On CPU numpy's isfinite is several times faster than torch's; bfloat16 is non-finite
    exactly when its exponent bits are all ones.
    """
    if isinstance(x, Tensor) and x.device.type != "cpu":
        bad_t = ~torch.isfinite(x.detach())
        return bad_t.cpu().numpy() if bool(bad_t.any()) else None
    if isinstance(x, Tensor) and x.dtype == torch.bfloat16:
        bad = (x.detach().contiguous().view(torch.int16).numpy() & 0x7F80) == 0x7F80
    else:
        bad = ~np.isfinite(x.detach().numpy() if isinstance(x, Tensor) else x)
    return bad if bad.any() else None


def find_nonfinite(x: Tensor | np.ndarray) -> tuple[int, int, int]:
    """NaN/inf in ``x`` [N, ...], in one streaming pass over chunks of rows.

    Returns (number of non-finite values, number of rows holding one, first such row or -1).
    """
    N = int(x.shape[0])
    itemsize = x.element_size() if isinstance(x, Tensor) else x.itemsize
    step = max(1, _CHECK_BYTES // max(1, int(np.prod(x.shape[1:])) * itemsize))
    count, rows, first = 0, 0, -1
    for start in range(0, N, step):
        bad = _nonfinite_mask(x[start: start + step])
        if bad is None:
            continue
        bad_rows = bad.reshape(bad.shape[0], -1).any(axis=1)
        count += int(bad.sum())
        rows += int(bad_rows.sum())
        if first < 0:
            first = start + int(np.argmax(bad_rows))
    return count, rows, first


def check_finite(x: Tensor | np.ndarray, what: str) -> None:
    """Refuse NaN/inf anywhere in ``x`` [N, ...], naming how many and the first bad row."""
    count, rows, first = find_nonfinite(x)
    if count:
        raise DataError(
            f"{what} holds {count} NaN or inf value(s) in {rows} of its {x.shape[0]} rows, the "
            f"first at row {first}; drop or fix those rows before training, e.g. "
            "x[torch.isfinite(x).flatten(1).all(1)]"
        )


def fingerprint(x: Tensor | np.ndarray, n_rows: int = FINGERPRINT_ROWS) -> str:
    """Content hash of ``x`` [N, S, D]: its shape, dtype and ``n_rows`` evenly spaced rows.

    Cheap for any size (a memory-mapped file reads ``n_rows`` rows), and any other data of
    the same shape (another harvest, model or file) changes it.
    """
    N = int(x.shape[0])
    index = np.unique(np.linspace(0, N - 1, min(n_rows, N)).round().astype(np.int64))
    dtype = str(x.dtype).removeprefix("torch.")
    digest = hashlib.sha256(f"{tuple(int(n) for n in x.shape)} {dtype}".encode())
    if isinstance(x, Tensor):
        rows = x[torch.from_numpy(index).to(x.device)].detach().cpu().contiguous()
        digest.update(rows.view(torch.uint8).numpy().tobytes())
    else:
        digest.update(np.ascontiguousarray(x[index]).tobytes())
    return digest.hexdigest()[:16]


def _check_batch_finite(x: Tensor, what: str) -> None:
    count, rows, first = find_nonfinite(x)
    if count:
        raise DataError(
            f"{what} contain {count} NaN or inf value(s) in {rows} token(s), the first at row "
            f"{first} of the batch; clean or drop those tokens before training"
        )


class TensorSource:
    """An in-memory tensor or memory-mapped array [N, S, D], shuffled by epoch.

    The last ``n_eval`` tokens of a fixed seeded permutation are held out. Epoch ``e`` is
    ``randperm(n_train)`` under seed ``(seed, e)``, so batch ``i`` is computable directly.
    Every row (held-out ones too) is checked for NaN/inf once, here, so bad data is refused
    before a run starts rather than when (or if) training reaches the bad row.
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
        check_finite(acts_NSD, "the activation tensor" if name == "tensor" else name)

    @property
    def n_train(self) -> int:
        return len(self.train_idx)

    def _rows(self, idx: Tensor) -> Tensor:
        if isinstance(self.acts, Tensor):
            out = self.acts[idx]
        else:  # numpy memmap: sorted reads are much faster from disk
            out = torch.from_numpy(np.ascontiguousarray(self.acts[np.sort(idx.numpy())]))
        return out.float() if out.dtype != torch.float64 else out

    def _epoch_perm(self, seed: int, epoch: int) -> Tensor:
        gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        return self.train_idx[torch.randperm(self.n_train, generator=gen)]

    def batches(self, batch_size: int, seed: int, start: int = 0,
                shard: tuple[int, int] | None = None) -> Iterator[Tensor]:
        lo, hi = shard_rows(batch_size, shard)
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
            yield self._rows(torch.cat(parts)[lo:hi])  # only this rank's rows are read

    def eval_batches(self, batch_size: int) -> Iterator[Tensor]:
        for i in range(0, len(self.eval_idx), batch_size):
            yield self._rows(self.eval_idx[i: i + batch_size])

    def sample(self, n_tokens: int, seed: int) -> Tensor:
        gen = torch.Generator().manual_seed(seed)
        pick = torch.randperm(self.n_train, generator=gen)[:n_tokens]
        return self._rows(self.train_idx[pick])

    def mean_squared_norm(self) -> Tensor | None:
        return None

    @cached_property
    def fingerprint(self) -> str:
        return fingerprint(self.acts)

    def describe(self) -> dict:
        return {"kind": "tensor", "name": self.name, "n_tokens": int(self.acts.shape[0]),
                "n_sources": self.n_sources, "d_model": self.d_model,
                "fingerprint": self.fingerprint}


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
            _check_batch_finite(batch, "batches")
            yield batch.float()

    def batches(self, batch_size: int, seed: int, start: int = 0,
                shard: tuple[int, int] | None = None) -> Iterator[Tensor]:
        """The iterable's batches (each cut to the rank's rows with ``shard``)."""
        if shard is not None:
            yield from _cut(self.batches(batch_size, seed, start), shard)
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
