"""Open, validate and read an activation store (an ``ActivationSource``: the trainer's
shuffled batches and the analysis's rows, tokens and context windows)."""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from crosscoders.data.checks import find_nonfinite
from crosscoders.data.shard import shard_rows
from crosscoders.errors import DataError
from crosscoders.io import read_json
from crosscoders.store import format as fmt
from crosscoders.store.shuffle import ShufflePlan, Window

DEFAULT_WINDOW_BYTES = 256 << 20  # memory of one shuffle window (stored dtype)
DEFAULT_CHUNK_ROWS = 2048  # consecutive rows read together (locality vs shuffle quality)
DEFAULT_READ_THREADS = min(4, os.cpu_count() or 1)


def _npy_header(path: Path) -> tuple[int, tuple[int, ...], np.dtype]:
    """Data offset, shape and dtype of an ``.npy`` file (ValueError on a corrupt header)."""
    with open(path, "rb") as handle:
        version = np.lib.format.read_magic(handle)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(handle)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(handle)
        else:
            raise ValueError(f"unsupported .npy version {version}")
        return handle.tell(), shape, dtype


def _corrupt(where: str) -> DataError:
    return DataError(
        f"{where} is corrupt: its sha256 does not match the manifest, so it is not what was "
        "harvested; restore the file from a copy, or harvest again into a new directory"
    )


class ActivationStore:
    """A finished activation store on disk: [N, S, D] rows, token ids and their provenance.

    Rows are in harvest order. The last ``n_eval`` rows (rounded down to a context boundary so
    that no context is split) are the held-out split; the rest is the training split.

    Unless opened with ``verify="none"``, the trainer's reads (``batches``, ``eval_batches``,
    ``sample``) check the sha256 of a shard's activation files the first time they touch the
    shard, so corrupt bytes are never trained on: one hash per shard per opened store.
    """

    def __init__(self, root: Path, manifest: dict[str, Any], eval_tokens: int | float | None):
        self.root = root
        self.manifest = manifest
        self.n_tokens: int = int(manifest["n_tokens"])
        self.n_sources: int = int(manifest["n_sources"])
        self.d_model: int = int(manifest["d_model"])
        self.dtype: str = manifest["dtype"]
        self.sources: list[dict[str, Any]] = manifest.get("sources", [])
        self.shards: list[dict[str, Any]] = manifest["shards"]
        sizes = [int(s["n_tokens"]) for s in self.shards]
        self._offsets = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
        self._acts: dict[tuple[int, int], np.ndarray] = {}
        self._records: dict[int, np.ndarray] = {}  # shard position -> memory-mapped rows.npy
        self._data_offsets: dict[tuple[int, int], int] = {}  # (shard, source) -> data offset
        self._lock = threading.Lock()
        self.verify_reads = True
        self._verified: set[int] = set()  # shard positions whose activations were hashed
        self._verify_lock = threading.Lock()
        self.window_rows = max(1, DEFAULT_WINDOW_BYTES // self.row_bytes)
        self.chunk_rows = DEFAULT_CHUNK_ROWS
        self.read_threads = DEFAULT_READ_THREADS  # threads reading and gathering batches
        if eval_tokens is None:
            eval_tokens = manifest.get("eval_tokens", 0)
        self.n_train = self._split(eval_tokens)
        self.n_eval = self.n_tokens - self.n_train

    # -- opening and validation ------------------------------------------------------------
    @classmethod
    def open(
        cls,
        path: str | Path,
        verify: Literal["quick", "full", "none"] = "quick",
        eval_tokens: int | float | None = None,
    ) -> ActivationStore:
        """Open a store, checking file sizes, headers and statistics (see :meth:`verify`).

        ``verify="full"`` also checks every file's sha256 now, instead of each shard's on its
        first read by the trainer; ``"none"`` checks nothing, now or later.
        ``eval_tokens`` overrides the held-out split recorded at harvest time: a count of
        tokens (>= 1) or a fraction of the store (< 1).
        """
        root = Path(path)
        manifest_path = root / fmt.MANIFEST
        if not manifest_path.exists():
            if (root / fmt.PROGRESS).exists():
                progress = read_json(root / fmt.PROGRESS, fix="re-harvest the store")
                raise DataError(
                    f"activation store {root} is incomplete: the harvest stopped after "
                    f"{len(progress.get('shards', []))} shard(s); run the same harvest command "
                    "again to resume it"
                )
            what = "does not exist" if not root.exists() else "has no manifest.json"
            raise DataError(f"{root} is not an activation store ({what}); harvest one first")
        manifest = read_json(manifest_path, fix="re-harvest the store")
        if manifest.get("format") != fmt.FORMAT_NAME:
            raise DataError(f"{manifest_path} is not a {fmt.FORMAT_NAME} manifest")
        if manifest.get("version", 0) > fmt.FORMAT_VERSION:
            raise DataError(
                f"{root} uses store format version {manifest['version']}; this crosscoders "
                f"reads up to {fmt.FORMAT_VERSION}: upgrade crosscoders"
            )
        store = cls(root, manifest, eval_tokens)
        store.verify_reads = verify != "none"
        if verify != "none":
            store.verify(full=verify == "full")
        return store

    def verify(self, full: bool = False) -> None:
        """Check every shard file's presence, size and header, and (full) its sha256.

        The small statistics files are always hashed and must be finite: the harvest summed
        every row into them, so NaN/inf anywhere in the store shows there, and only such a
        shard is then read to name its first bad row.
        """
        stats_files = {fmt.stats_name(s) for s in range(self.n_sources)}
        for position, shard in enumerate(self.shards):
            directory = fmt.shard_dir(self.root, int(shard["index"]))
            expected_files = {"rows.npy", "contexts.npy"}
            for s in range(self.n_sources):
                expected_files |= {fmt.acts_name(s), fmt.stats_name(s)}
            missing = sorted(expected_files - set(shard["files"]))
            if missing:
                raise DataError(
                    f"manifest of {self.root} lists no {missing[0]} for shard {shard['index']}"
                )
            for name, info in shard["files"].items():
                path = directory / name
                where = f"shard {shard['index']} ({path.relative_to(self.root)})"
                if not path.exists():
                    raise DataError(f"{where} is missing from {self.root}; re-harvest the store")
                size = path.stat().st_size
                if size != info["bytes"]:
                    raise DataError(
                        f"{where} is truncated or corrupt: {size} bytes, expected {info['bytes']}; "
                        "re-harvest the store"
                    )
                try:
                    offset, shape, dtype = _npy_header(path)
                except ValueError as err:
                    raise DataError(f"{where} is corrupt ({err}); re-harvest the store") from None
                if offset + int(np.prod(shape)) * dtype.itemsize != size:
                    raise DataError(
                        f"{where} is corrupt: its header says {shape} {dtype} but the file has "
                        f"{size} bytes; re-harvest the store"
                    )
                if (full or name in stats_files) and fmt.sha256_file(path) != info["sha256"]:
                    raise _corrupt(where)
            if not all(np.isfinite(np.load(directory / name)).all() for name in stats_files):
                self._raise_nonfinite(position)
        if full:
            self._verified.update(range(len(self.shards)))

    def _check_reads(self, positions: Iterable[int]) -> None:
        """Hash the activation files of shards not read before, once each, in parallel."""
        if not self.verify_reads:
            return
        todo = {int(k) for k in positions} - self._verified
        if not todo:
            return
        with self._verify_lock:
            jobs = [(k, s) for k in sorted(todo - self._verified) for s in range(self.n_sources)]
            if not jobs:  # another reader (a second iterator's thread) hashed them meanwhile
                return

            def check(job: tuple[int, int]) -> None:
                shard = self.shards[job[0]]
                name = fmt.acts_name(job[1])
                path = fmt.shard_dir(self.root, int(shard["index"])) / name
                if fmt.sha256_file(path) != shard["files"][name]["sha256"]:
                    raise _corrupt(f"shard {shard['index']} ({path.relative_to(self.root)})")

            if len(jobs) == 1:
                check(jobs[0])
            else:  # hashlib releases the GIL: shards hash side by side
                with ThreadPoolExecutor(min(len(jobs), os.cpu_count() or 1, 8)) as pool:
                    list(pool.map(check, jobs))
            self._verified.update(k for k, _ in jobs)

    def _shards_of(self, start: int, stop: int) -> range:
        """Positions of the shards holding rows ``[start, stop)``."""
        if start >= stop:
            return range(0)
        first = int(np.searchsorted(self._offsets, start, side="right") - 1)
        last = int(np.searchsorted(self._offsets, stop - 1, side="right") - 1)
        return range(first, last + 1)

    def _raise_nonfinite(self, position: int) -> None:
        """Name the first NaN/inf row of a shard whose statistics are not finite."""
        shard = self.shards[position]
        lo, hi = int(self._offsets[position]), int(self._offsets[position + 1])
        count, rows, first = 0, 0, -1
        for start in range(lo, hi, 65536):
            c, r, f = find_nonfinite(self.rows(start, min(hi, start + 65536)))
            count, rows = count + c, rows + r
            if first < 0 <= f:
                first = start + f
        fix = "harvest again into a new directory"
        if not count:
            raise DataError(
                f"shard {shard['index']} of activation store {self.root} has statistics that are "
                f"not finite although its activations are; {fix}"
            )
        raise DataError(
            f"shard {shard['index']} of activation store {self.root} holds {count} NaN or inf "
            f"value(s) in {rows} row(s), the first at row {first} of the store (row {first - lo} "
            f"of the shard); the model produced non-finite activations: {fix} (a float16 store "
            "overflows beyond 65504: use store_dtype bfloat16 or float32)"
        )

    def _split(self, eval_tokens: int | float) -> int:
        """Number of training rows for a held-out split of ``eval_tokens`` (count or fraction)."""
        if eval_tokens < 0:
            raise DataError(f"eval_tokens must be >= 0, got {eval_tokens}")
        n_eval = int(round(eval_tokens * self.n_tokens)) if eval_tokens < 1 else int(eval_tokens)
        if n_eval == 0:
            return self.n_tokens
        if n_eval >= self.n_tokens:
            raise DataError(
                f"eval_tokens={eval_tokens} leaves no training tokens in {self.root} "
                f"({self.n_tokens} tokens); ask for fewer held-out tokens"
            )
        boundary = self.n_tokens - n_eval
        # Move the boundary back to the start of the context that contains it. Shards hold
        # whole contexts, so only the boundary's shard is read.
        shard = int(np.searchsorted(self._offsets, boundary, side="right") - 1)
        contexts = self._shard_records(shard)["context"]
        local = boundary - int(self._offsets[shard])
        first = int(self._offsets[shard]) + int(np.searchsorted(contexts, contexts[local]))
        return first if first > 0 else boundary

    # -- identity ----------------------------------------------------------------------------
    @property
    def row_bytes(self) -> int:
        return self.n_sources * self.d_model * fmt.storage_dtype(self.dtype).itemsize

    @cached_property
    def manifest_sha256(self) -> str:
        return hashlib.sha256((self.root / fmt.MANIFEST).read_bytes()).hexdigest()

    def describe(self) -> dict[str, Any]:
        """JSON-able identity of the data a trainer reads (refuse resume if it changes)."""
        return {
            "kind": "activation_store",
            "path": str(self.root.resolve()),
            "n_tokens": self.n_tokens,
            "n_train": self.n_train,
            "n_eval": self.n_eval,
            "n_sources": self.n_sources,
            "d_model": self.d_model,
            "dtype": self.dtype,
            "sources": [s.get("name") for s in self.sources],
            "manifest_sha256": self.manifest_sha256,
            "shuffle": {"chunk_rows": self.chunk_rows, "window_rows": self.window_rows},
        }

    def __len__(self) -> int:
        return self.n_tokens

    def __repr__(self) -> str:
        names = ", ".join(str(s.get("name")) for s in self.sources)
        return (
            f"ActivationStore({str(self.root)!r}, n_tokens={self.n_tokens}, "
            f"sources=[{names}], d_model={self.d_model}, dtype={self.dtype})"
        )

    # -- raw access --------------------------------------------------------------------------
    def _shard_acts(self, shard: int, source: int) -> np.ndarray:
        key = (shard, source)
        array = self._acts.get(key)
        if array is None:
            path = fmt.shard_dir(self.root, shard) / fmt.acts_name(source)
            offset, shape, dtype = _npy_header(path)
            array = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)
            with self._lock:
                self._acts[key] = array
        return array

    def read(self, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """Rows ``[start, stop)`` in the stored dtype, [n, S, D] (bf16 as uint16 bits)."""
        if not 0 <= start <= stop <= self.n_tokens:
            raise IndexError(f"rows [{start}, {stop}) outside the store's {self.n_tokens} rows")
        if out is None:
            out = np.empty(
                (stop - start, self.n_sources, self.d_model), fmt.storage_dtype(self.dtype)
            )
        first = int(np.searchsorted(self._offsets, start, side="right") - 1)
        pos = start
        shard = first
        while pos < stop:
            lo, hi = int(self._offsets[shard]), int(self._offsets[shard + 1])
            a, b = pos - lo, min(stop, hi) - lo
            for s in range(self.n_sources):
                out[pos - start : pos - start + b - a, s] = self._shard_acts(shard, s)[a:b]
            pos += b - a
            shard += 1
        return out

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` as float32 [n, S, D] (the analysis's in-order read)."""
        return fmt.to_float32(self.read(start, stop), self.dtype)

    def gather(self, index: np.ndarray) -> torch.Tensor:
        """Rows at sorted or unsorted indices as float32 [n, S, D]."""
        index = np.asarray(index, dtype=np.int64)
        out = np.empty((index.size, self.n_sources, self.d_model), fmt.storage_dtype(self.dtype))
        order = np.argsort(index, kind="stable")
        for sel, shard, local in self._by_shard(index[order]):
            for s in range(self.n_sources):
                out[order[sel], s] = self._shard_acts(shard, s)[local]
        return fmt.to_float32(out, self.dtype)

    def _by_shard(self, rows: np.ndarray) -> Iterator[tuple[np.ndarray, int, np.ndarray]]:
        """For each shard that ascending store ``rows`` fall in: their positions in ``rows``,
        the shard, and the rows within it."""
        shard_of = np.searchsorted(self._offsets, rows, side="right") - 1
        for shard in np.unique(shard_of):
            sel = np.nonzero(shard_of == shard)[0]
            yield sel, int(shard), rows[sel] - self._offsets[shard]

    # -- tokens and provenance -----------------------------------------------------------------
    def _shard_records(self, position: int) -> np.ndarray:
        """The row records of the shard at ``position``, memory-mapped (read once opened)."""
        records = self._records.get(position)
        if records is None:
            path = fmt.shard_dir(self.root, int(self.shards[position]["index"])) / "rows.npy"
            records = np.load(path, mmap_mode="r")
            with self._lock:
                self._records[position] = records
        return records

    def records(self, start: int, stop: int) -> np.ndarray:
        """[n] row records (token, context, position, doc, doc_pos, dataset) of rows
        ``[start, stop)``, read through memory maps: nothing of size N is held."""
        if not 0 <= start <= stop <= self.n_tokens:
            raise IndexError(f"rows [{start}, {stop}) outside the store's {self.n_tokens} rows")
        parts = []
        for k in self._shards_of(start, stop):
            lo = int(self._offsets[k])
            a, b = max(start, lo) - lo, min(stop, int(self._offsets[k + 1])) - lo
            parts.append(self._shard_records(k)[a:b])
        return np.concatenate(parts) if parts else np.empty(0, fmt.ROW_DTYPE)

    @cached_property
    def rows_meta(self) -> np.ndarray:
        """[N] structured array: token, context, position, doc, doc_pos, dataset per row."""
        return self.records(0, self.n_tokens)

    @property
    def tokens(self) -> np.ndarray:
        """[N] int32 token id of each row (aligned with the activations)."""
        return self.rows_meta["token"]

    def token_ids(self, start: int, stop: int) -> np.ndarray:
        """[n] int64 token id of rows ``[start, stop)``."""
        return self.records(start, stop)["token"].astype(np.int64)

    def positions(self, start: int, stop: int) -> np.ndarray:
        """[n] int64 position of rows ``[start, stop)`` in their model input."""
        return self.records(start, stop)["position"].astype(np.int64)

    @cached_property
    def _contexts(self) -> tuple[np.ndarray, np.ndarray]:
        """All model inputs [M, T] (-1 padded) and the global index of the first one per shard."""
        arrays = [
            np.load(fmt.shard_dir(self.root, int(s["index"])) / "contexts.npy") for s in self.shards
        ]
        width = max((a.shape[1] for a in arrays), default=0)
        padded = [np.pad(a, ((0, 0), (0, width - a.shape[1])), constant_values=-1) for a in arrays]
        first = np.array([int(s["seq_start"]) for s in self.shards], dtype=np.int64)
        return (np.concatenate(padded) if padded else np.zeros((0, 0), np.int32)), first

    def context_tokens(self, context: int) -> np.ndarray:
        """Token ids fed to the model for global context index ``context`` (no padding)."""
        contexts, _ = self._contexts
        seq_start = int(self.shards[0]["seq_start"]) if self.shards else 0
        ids = contexts[context - seq_start]
        return ids[ids >= 0]

    def locate(self, row: int) -> dict[str, int]:
        """Provenance of a row: token, context (model input) and position, doc and doc_pos."""
        rec = self.records(row, row + 1)[0]
        return {name: int(rec[name]) for name in fmt.ROW_DTYPE.names}

    def window(self, row: int, before: int, after: int) -> tuple[np.ndarray, np.ndarray, int]:
        """Token ids around ``row`` inside its model input ([w] int64), the store row of each
        (-1 where the position was not stored, e.g. a BOS) and the index of ``row`` in them."""
        rec = self.records(row, row + 1)[0]
        ids = self.context_tokens(int(rec["context"])).astype(np.int64)
        pos = int(rec["position"])
        lo, hi = max(0, pos - before), min(ids.size, pos + after + 1)
        rows = np.full(hi - lo, -1, dtype=np.int64)
        # Stored rows of one context are consecutive, in position order.
        first = max(0, row - before)
        near = self.records(first, min(self.n_tokens, row + after + 1))
        for k, r in enumerate(near):
            if r["context"] == rec["context"] and lo <= r["position"] < hi:
                rows[int(r["position"]) - lo] = first + k
        return ids[lo:hi], rows, pos - lo

    def context(self, row: int, before: int = 32, after: int = 0) -> tuple[np.ndarray, int]:
        """Token ids around ``row`` inside its model input, and the row's index in them."""
        ids, _, center = self.window(row, before, after)
        return ids, center

    # -- statistics --------------------------------------------------------------------------
    @cached_property
    def _train_sums(self) -> np.ndarray:
        """[S, D + 1] float64 sums of x and ||x||^2 over the training split."""
        total = np.zeros((self.n_sources, self.d_model + 1), dtype=np.float64)
        self._check_reads(self._shards_of(self.n_train, self.n_tokens))
        for shard in self.shards:
            directory = fmt.shard_dir(self.root, int(shard["index"]))
            for s in range(self.n_sources):
                total[s] += np.load(directory / fmt.stats_name(s))
        # The harvest summed every row; take the held-out rows back out (the split is small).
        for start in range(self.n_train, self.n_tokens, 65536):
            x = self.rows(start, min(self.n_tokens, start + 65536)).double()
            total[:, :-1] -= x.sum(0).numpy()
            total[:, -1] -= (x * x).sum((0, 2)).numpy()
        return total

    def mean_squared_norm(self) -> torch.Tensor | None:
        """[S] mean of ||x_s||^2 over the training split (from harvest-time sums)."""
        return torch.from_numpy(self._train_sums[:, -1] / self.n_train).float()

    def mean(self) -> torch.Tensor:
        """[S, D] mean activation per source over the training split."""
        return torch.from_numpy(self._train_sums[:, :-1] / self.n_train).float()

    # -- the trainer's protocol ----------------------------------------------------------------
    def _load_window(self, window: Window, out: np.ndarray | None = None,
                     pool: ThreadPoolExecutor | None = None) -> np.ndarray:
        """The window's rows as [S, n, D] (stored dtype), read with plain sequential reads
        into ``out`` (reused across windows: no fresh pages to fault in), one read per chunk
        and source, spread over ``pool``'s threads (file reads release the GIL)."""
        self._check_reads(k for a, b in window.ranges for k in self._shards_of(a, b))
        buf = self._window_buffer(out, window.n_rows)
        jobs = []
        pos = 0
        for a, b in window.ranges:
            shard = int(np.searchsorted(self._offsets, a, side="right") - 1)
            while a < b:
                lo, hi = int(self._offsets[shard]), int(self._offsets[shard + 1])
                n = min(b, hi) - a
                jobs += [(shard, s, a - lo, buf[s, pos : pos + n]) for s in range(self.n_sources)]
                a, pos, shard = a + n, pos + n, shard + 1
        if pool is None or len(jobs) == 1:
            for job in jobs:
                self._read_into(*job)
        else:  # result() re-raises a failed read here, in the window's thread
            for future in [pool.submit(self._read_into, *job) for job in jobs]:
                future.result()
        return buf

    def _window_buffer(self, out: np.ndarray | None, n_rows: int) -> np.ndarray:
        """[S, n_rows, D] in the stored dtype: a view of ``out`` when it is large enough."""
        if out is None or out.shape[1] < n_rows:
            return np.empty((self.n_sources, n_rows, self.d_model), fmt.storage_dtype(self.dtype))
        return out[:, :n_rows]

    def _read_into(self, shard: int, source: int, start: int, out: np.ndarray) -> None:
        path = fmt.shard_dir(self.root, int(self.shards[shard]["index"])) / fmt.acts_name(source)
        offset = self._data_offsets.get((shard, source))
        if offset is None:  # parsed once per file: small chunks then cost one open and read
            offset = self._data_offsets.setdefault((shard, source), _npy_header(path)[0])
        with open(path, "rb", buffering=0) as handle:  # unbuffered: one read into ``out``
            handle.seek(offset + start * self.row_bytes // self.n_sources)
            view = memoryview(out).cast("B")
            done = 0
            while done < out.nbytes:  # a raw read may return less than asked
                got = handle.readinto(view[done:])
                if not got:
                    raise DataError(f"{path} is shorter than its header says; re-harvest the store")
                done += got

    def _gather_window(self, data: np.ndarray, index: np.ndarray,
                       pool: ThreadPoolExecutor | None = None, parts: int = 1) -> torch.Tensor:
        """Rows ``index`` of a [S, n, D] window as float32 [B, S, D], in ``parts`` row blocks
        on ``pool`` (numpy's copies release the GIL)."""
        out = np.empty((index.size, self.n_sources, self.d_model), np.float32)
        bounds = np.linspace(0, index.size, max(1, min(parts, index.size // 256)) + 1).astype(int)
        blocks = list(zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True))
        if pool is None or len(blocks) == 1:
            for a, b in blocks:
                self._gather_block(data, index[a:b], out[a:b])
        else:
            for future in [pool.submit(self._gather_block, data, index[a:b], out[a:b])
                           for a, b in blocks]:
                future.result()
        return torch.from_numpy(out)

    def _gather_block(self, data: np.ndarray, index: np.ndarray, out: np.ndarray) -> None:
        if self.dtype == "bfloat16":
            # bf16 bits are the top half of a float32: copy them widened, shift once (exact).
            bits = out.view(np.uint32)
            for s in range(self.n_sources):
                bits[:, s] = data[s][index]
            np.left_shift(bits, 16, out=bits)
        else:
            for s in range(self.n_sources):
                fmt.to_float32_numpy(data[s][index], self.dtype, out=out[:, s])

    def _load_rows(self, window: Window, rows: np.ndarray,
                   out: np.ndarray | None = None) -> np.ndarray:
        """Rows ``rows`` (sorted indices into the window) as [S, n, D] (stored dtype).

        A data-parallel rank reads only its own rows of a window, never the others'.
        """
        self._check_reads(k for a, b in window.ranges for k in self._shards_of(a, b))
        starts = np.array([a for a, _ in window.ranges], dtype=np.int64)
        lengths = np.array([b - a for a, b in window.ranges], dtype=np.int64)
        firsts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        which = np.searchsorted(firsts, rows, side="right") - 1
        store_rows = starts[which] + rows - firsts[which]  # ascending, as ranges are
        buf = self._window_buffer(out, rows.size)
        for sel, shard, local in self._by_shard(store_rows):
            for s in range(self.n_sources):
                buf[s, sel] = self._shard_acts(shard, s)[local]
        return buf

    def _window_part(self, window: Window, offset: int, batch_size: int,
                     shard: tuple[int, int] | None, out: np.ndarray | None = None,
                     pool: ThreadPoolExecutor | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The window's rows this rank trains on from ``offset``: (data [S, n, D], the
        indices into it in the order they are emitted), read into ``out`` when it fits."""
        if shard is None or shard[1] == 1:
            return self._load_window(window, out, pool), window.order[offset:]
        rank, world = shard
        positions = np.arange(offset, window.n_rows, dtype=np.int64)
        stream = window.epoch * self.n_train + window.start + positions
        mine = (stream % batch_size) // (batch_size // world) == rank
        rows = window.order[positions[mine]]
        sorted_rows = np.sort(rows)
        return self._load_rows(window, sorted_rows, out), np.searchsorted(sorted_rows, rows)

    def batches(self, batch_size: int, seed: int, start: int = 0,
                shard: tuple[int, int] | None = None) -> Iterator[torch.Tensor]:
        """Endless shuffled float32 batches [B, S, D] of the training split.

        Epochs repeat with a new shuffle; ``start=n`` yields batch ``n`` first and reads
        only the window that holds it. The next window is read in a background thread.
        ``shard=(rank, world)`` yields rows ``[rank * B / world, (rank + 1) * B / world)``
        of each batch and reads only those rows of every window.
        """
        if batch_size <= 0:
            raise DataError(f"batch_size must be positive, got {batch_size}")
        lo, hi = shard_rows(batch_size, shard)
        part = hi - lo
        plan = ShufflePlan(self.n_train, self.chunk_rows, self.window_rows, seed)
        windows = plan.windows_from(start * batch_size)
        threads = max(1, self.read_threads)
        # Two window buffers, reused in turn: one is gathered from while the next window is
        # read into the other (batches are copies, so a buffer is free once its window ends).
        rows_max = min(plan.chunks_per_window * plan.chunk_rows, self.n_train)
        buffers = [self._window_buffer(None, rows_max) for _ in range(2)]
        loader = ThreadPoolExecutor(max_workers=1)  # reads the next window ahead
        readers = ThreadPoolExecutor(max_workers=threads) if threads > 1 else None
        try:
            window, offset = next(windows)
            pending = loader.submit(self._window_part, window, offset, batch_size, shard,
                                    buffers[0], readers)
            turn = 0
            pieces: list[torch.Tensor] = []
            have = 0
            while True:
                data, order = pending.result()
                next_window, next_offset = next(windows)
                turn ^= 1
                pending = loader.submit(self._window_part, next_window, next_offset,
                                        batch_size, shard, buffers[turn], readers)
                offset = 0
                while offset < order.size:
                    take = min(part - have, order.size - offset)
                    pieces.append(self._gather_window(data, order[offset : offset + take],
                                                      readers, threads))
                    offset += take
                    have += take
                    if have == part:
                        yield pieces[0] if len(pieces) == 1 else torch.cat(pieces)
                        pieces, have = [], 0
                del data
        finally:
            for pool in (loader, readers):
                try:
                    if pool is not None:
                        pool.shutdown(wait=False, cancel_futures=True)
                except Exception:  # interpreter shutdown: the pool's modules are already gone
                    pass

    def eval_batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        """The held-out rows, in order, as float32 batches [B, S, D] (the last may be short)."""
        self._check_reads(self._shards_of(self.n_train, self.n_tokens))
        for start in range(self.n_train, self.n_tokens, batch_size):
            yield self.rows(start, min(self.n_tokens, start + batch_size))

    def sample(self, n_tokens: int, seed: int) -> torch.Tensor:
        """``min(n_tokens, n_train)`` random training rows [n, S, D] float32."""
        n = min(int(n_tokens), self.n_train)
        index = np.sort(np.random.default_rng(seed).choice(self.n_train, size=n, replace=False))
        self._check_reads(np.unique(np.searchsorted(self._offsets, index, side="right") - 1))
        return self.gather(index)
