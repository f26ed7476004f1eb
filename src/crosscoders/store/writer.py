"""Write an activation store shard by shard, so that a killed harvest resumes exactly.

Every file is written beside its target and renamed into place (``crosscoders.io``), then
``progress.json`` is rewritten to record it. A shard counts only once ``progress.json``
lists it, so a kill at any moment loses at most the shards being written. ``manifest.json``
is written last: a store without it is never opened as complete.

Files are hashed from memory as they are written (never read back), the files of one shard
are written by parallel threads, and ``BackgroundCommits`` commits shards behind the caller
(writing several at once, recording them in order).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from crosscoders.errors import ConfigError, CrosscodersError
from crosscoders.io import atomic_write, read_json, write_json
from crosscoders.store import format as fmt


@dataclass
class ShardMeta:
    """Model-independent part of a shard: which tokens it holds and where they came from."""

    rows: np.ndarray  # [n] fmt.ROW_DTYPE
    contexts: np.ndarray  # [m, T] int32, -1 = padding
    seq_start: int  # global index of the first context in the shard
    seq_end: int  # one past the last context
    masked: dict[str, int] = field(default_factory=dict)


# A shard's arrays per group: {group: ({source: [n, D] acts}, {source: [D + 1] stats} or None)}.
Parts = dict[str, tuple[dict[int, np.ndarray], dict[int, np.ndarray] | None]]
T = TypeVar("T")

# Threads writing the files of one shard (each file is written and hashed by one thread).
WRITE_THREADS = max(1, min(8, os.cpu_count() or 1))
_CHUNK = 1 << 22  # bytes hashed then written at a time (stays in cache between the two)
_STATS_ELEMENTS = 1 << 20  # values summed at a time by shard_stats


def _save_npy(path: Path, array: np.ndarray) -> dict[str, Any]:
    """Write ``array`` as ``np.save`` does, atomically and fsynced; return its sha256 and size.

    The sha256 is taken from the bytes in memory as they are written, not by reading the file.
    """
    array = np.ascontiguousarray(array)
    header = fmt.npy_header(array)
    data = array.reshape(-1).view(np.uint8)
    digest = hashlib.sha256(header)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as handle:
            handle.write(header)
            for start in range(0, data.size, _CHUNK):
                chunk = data[start : start + _CHUNK]
                digest.update(chunk)  # hashlib and write release the GIL on large buffers
                handle.write(chunk)

    atomic_write(path, write)
    return {"sha256": digest.hexdigest(), "bytes": len(header) + data.size}


def shard_stats(array: np.ndarray, dtype: str) -> np.ndarray:
    """[D + 1] float64: the column sums of a stored [n, D] array and its sum of squares.

    In numpy, a block of rows at a time: it runs on the write threads, where memory must
    stay bounded and torch would start an OpenMP team per thread.
    """
    n, d = array.shape
    sums = np.zeros(d, dtype=np.float64)
    squares = np.zeros(d, dtype=np.float64)  # column sums of x^2
    step = max(1, _STATS_ELEMENTS // max(d, 1))
    x32 = np.empty((min(step, n), d), dtype=np.float32)
    x64 = np.empty((min(step, n), d), dtype=np.float64)
    for start in range(0, n, step):
        rows = array[start : start + step]
        x = fmt.to_float32_numpy(rows, dtype, out=x32[: len(rows)])
        y = x64[: len(rows)]
        y[...] = x
        sums += y.sum(0)
        np.square(y, out=y)
        squares += y.sum(0)
    return np.append(sums, squares.sum())


_ABSENT = object()


def _diff_paths(a: Any, b: Any, path: str = "") -> list[str]:
    """Where two JSON-like values differ, as ``key.path: A in the store, B now``."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            sub = f"{path}.{k}" if path else str(k)
            if k not in a or k not in b:
                out.append(_differs(sub, a.get(k, _ABSENT), b.get(k, _ABSENT)))
            else:
                out += _diff_paths(a[k], b[k], sub)
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _diff_paths(x, y, f"{path}[{i}]")]
    if json.dumps(a, sort_keys=True) != json.dumps(b, sort_keys=True):
        return [_differs(path, a, b)]
    return []


def _differs(path: str, a: Any, b: Any) -> str:
    return f"{path}: {_short(a)} in the store, {_short(b)} now"


def _short(value: Any, limit: int = 60) -> str:
    if value is _ABSENT:
        return "absent"
    text = json.dumps(value, sort_keys=True) if not isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _raise_if_disk_full(err: OSError, what: str, resume: str = "") -> None:
    """A clear error for a full disk (or quota); the caller re-raises anything else."""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        raise CrosscodersError(
            f"disk full while writing {what}: free some space and run the same command "
            f"again{resume}"
        ) from err


class StoreWriter:
    """Bookkeeping for one store directory being harvested.

    ``identity`` is what makes the content of the store (the harvest config minus purely
    operational fields); a directory holding a store with another identity is refused.
    ``groups`` name the independent writers (one per model): each records how many shards
    it has committed, so models can run together or one after the other.
    """

    def __init__(
        self,
        root: str | Path,
        identity: dict[str, Any],
        *,
        n_sources: int,
        d_model: int,
        dtype: str,
    ) -> None:
        self.root = Path(root)
        self.identity = identity
        self.n_sources = n_sources
        self.d_model = d_model
        self.dtype = dtype
        self.complete = (self.root / fmt.MANIFEST).exists()
        progress_path = self.root / fmt.PROGRESS
        if self.root.exists() and not self.root.is_dir():
            raise ConfigError(f"store path {self.root} is a file; give a directory for --out")
        if progress_path.exists():
            self.progress = read_json(progress_path, fix="harvest into a new directory")
        elif self.complete:
            self.progress = read_json(self.root / fmt.MANIFEST, fix="harvest into a new directory")
        elif self.root.exists() and any(self.root.iterdir()):
            raise ConfigError(
                f"{self.root} is not empty and holds no activation store; "
                "choose a new or empty directory for --out"
            )
        else:
            self.progress = {"identity": identity, "shards": [], "done": {}, "ended": None}
        old = self.progress.get("identity", {})
        if old != identity:
            diff = "; ".join(_diff_paths(old, identity)[:4])
            raise ConfigError(
                f"store directory {self.root} was harvested with another config (differs in: "
                f"{diff}); harvest with the store's settings to resume, use a new --out "
                f"directory, or delete {self.root} to start over"
            )
        self._clean_temp_files()

    # -- state ---------------------------------------------------------------------------
    def done(self, group: str) -> int:
        """Number of shards ``group`` has committed."""
        return int(self.progress["done"].get(group, 0))

    @property
    def n_shards_known(self) -> int:
        return len(self.progress["shards"])

    @property
    def ended(self) -> dict[str, int] | None:
        """``{"n_shards", "n_tokens"}`` once the token stream has been fully cut into shards."""
        return self.progress["ended"]

    def shard(self, index: int) -> dict[str, Any] | None:
        shards = self.progress["shards"]
        return shards[index] if index < len(shards) else None

    def seq_start(self, index: int) -> int:
        """Global context index at which shard ``index`` starts."""
        return 0 if index == 0 else int(self.progress["shards"][index - 1]["seq_end"])

    def rows_before(self, index: int) -> int:
        return sum(int(s["n_tokens"]) for s in self.progress["shards"][:index])

    # -- writing ---------------------------------------------------------------------------
    def commit(
        self,
        index: int,
        group: str,
        acts: dict[int, np.ndarray],
        meta: ShardMeta,
        stats: dict[int, np.ndarray] | None = None,
        *,
        files: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        """Write shard ``index`` for ``group`` (its sources' [n, D] arrays) and record it.

        ``stats`` are the sources' [D + 1] sums (``shard_stats``; computed here if None).
        ``files`` lists files ``commit_shard`` already wrote for these arrays: only record them.
        """
        with self._disk_errors(index):
            record = self._check(index, group, acts, meta)
            if files is None:
                files = self._write_files(index, self._files_of(acts, stats, meta, record is None))
            if record is None:
                if not {"rows.npy", "contexts.npy"} <= set(files):
                    raise CrosscodersError(f"internal error: shard {index} lacks its row files")
                record = {
                    "index": index,
                    "n_tokens": int(len(meta.rows)),
                    "n_contexts": int(meta.seq_end - meta.seq_start),
                    "seq_start": int(meta.seq_start),
                    "seq_end": int(meta.seq_end),
                    "masked": dict(meta.masked),
                    "files": {},
                }
                self.progress["shards"].append(record)
            record["files"].update(files)
            self.progress["done"][group] = index + 1
            self._save_progress()

    def write_shard(
        self, index: int, parts: Parts, meta: ShardMeta, with_meta: bool
    ) -> dict[str, dict[str, dict[str, Any]]]:
        """Write shard ``index``'s files for every group of ``parts`` ({group: (acts, stats)})
        at once, one thread per file (``with_meta``: the row files too); return each group's
        ``files`` for ``commit_shard``. Records nothing, so several shards may be written at
        once from several threads."""
        named: list[tuple[str, str, np.ndarray]] = []
        for group, (acts, stats) in parts.items():
            self._check_shapes(index, acts, meta)
            named += [(group, name, a) for name, a in self._files_of(acts, stats, meta, with_meta)]
            with_meta = False
        with self._disk_errors(index):
            written = self._write_files(index, [(name, array) for _, name, array in named])
        files: dict[str, dict[str, dict[str, Any]]] = {group: {} for group in parts}
        for group, name, _ in named:
            files[group][name] = written[name]
        return files

    def commit_shard(
        self,
        index: int,
        parts: Parts,
        meta: ShardMeta,
        files: dict[str, dict[str, dict[str, Any]]] | None = None,
    ) -> None:
        """``commit`` shard ``index`` for several groups ({group: (acts, stats)}), writing
        every file at once (``write_shard``) unless ``files`` says it was done."""
        if files is None:
            record = None
            for group, (acts, _) in parts.items():
                record = self._check(index, group, acts, meta)
            files = self.write_shard(index, parts, meta, with_meta=record is None)
        for group, (acts, stats) in parts.items():
            self.commit(index, group, acts, meta, stats, files=files[group])

    def end(self, n_shards: int, n_tokens: int) -> None:
        """Record that the token stream ends after ``n_shards`` shards (``n_tokens`` rows)."""
        ended = {"n_shards": int(n_shards), "n_tokens": int(n_tokens)}
        if self.ended is not None and self.ended != ended:
            raise CrosscodersError(
                f"{self.root}: this pass ended the stream at {ended}, an earlier one at "
                f"{self.ended}; the data changed between runs: harvest into a new directory"
            )
        self.progress["ended"] = ended
        self._save_progress()

    def finalize(self, extra: dict[str, Any]) -> dict[str, Any]:
        """Write ``manifest.json`` (the store is complete from then on) and return it."""
        if self.ended is None:
            raise CrosscodersError(f"internal error: finalize {self.root} before the stream ended")
        n_shards = self.ended["n_shards"]
        shards = self.progress["shards"][:n_shards]
        masked: dict[str, int] = {}
        for record in shards:
            for key, value in record["masked"].items():
                masked[key] = masked.get(key, 0) + int(value)
        manifest = {
            "format": fmt.FORMAT_NAME,
            "version": fmt.FORMAT_VERSION,
            "complete": True,
            "n_tokens": self.ended["n_tokens"],
            "n_sources": self.n_sources,
            "d_model": self.d_model,
            "dtype": self.dtype,
            "masked": masked,
            **extra,
            "identity": self.identity,
            "shards": shards,
        }
        try:
            write_json(self.root / fmt.MANIFEST, manifest, indent=1)
        except OSError as err:
            _raise_if_disk_full(err, f"the manifest of {self.root}")
            raise
        self.complete = True
        return manifest

    # -- helpers ---------------------------------------------------------------------------
    def _check(
        self, index: int, group: str, acts: dict[int, np.ndarray], meta: ShardMeta
    ) -> dict[str, Any] | None:
        """Refuse a commit out of order or unlike the pass that wrote the shard; return the
        shard's record if an earlier group made it."""
        if self.done(group) != index:
            raise CrosscodersError(
                f"internal error: group {group} commits shard {index} but has {self.done(group)}"
            )
        self._check_shapes(index, acts, meta)
        record = self.shard(index)
        directory = fmt.shard_dir(self.root, index)
        if record is None:
            if index != self.n_shards_known:
                raise CrosscodersError(f"internal error: shard {index} written out of order")
        elif (record["n_tokens"], record["seq_end"]) != (len(meta.rows), meta.seq_end):
            raise CrosscodersError(
                f"shard {index} of {self.root}: this pass cut the token stream differently "
                f"({len(meta.rows)} tokens, contexts to {meta.seq_end}) than the pass that "
                f"wrote it ({record['n_tokens']}, {record['seq_end']}); the data changed "
                "between runs: restore it or harvest into a new directory"
            )
        elif not np.array_equal(np.load(directory / "rows.npy")["token"], meta.rows["token"]):
            raise CrosscodersError(
                f"shard {index} of {self.root}: the tokens differ from the first pass; "
                "the data or tokenizer changed between runs: harvest into a new directory"
            )
        return record

    def _check_shapes(self, index: int, acts: dict[int, np.ndarray], meta: ShardMeta) -> None:
        for source, array in sorted(acts.items()):
            if array.shape != (len(meta.rows), self.d_model):
                raise CrosscodersError(
                    f"internal error: source {source} shard {index} has shape {array.shape}"
                )

    def _files_of(
        self,
        acts: dict[int, np.ndarray],
        stats: dict[int, np.ndarray] | None,
        meta: ShardMeta,
        with_meta: bool,
    ) -> list[tuple[str, np.ndarray]]:
        """(file name, array) of a group's files, in the order the record lists them."""
        named = [("rows.npy", meta.rows), ("contexts.npy", meta.contexts)] if with_meta else []
        for source, array in sorted(acts.items()):
            sums = shard_stats(array, self.dtype) if stats is None else stats[source]
            named += [(fmt.acts_name(source), array), (fmt.stats_name(source), sums)]
        return named

    def _write_files(
        self, index: int, named: list[tuple[str, np.ndarray]]
    ) -> dict[str, dict[str, Any]]:
        """Write the named arrays into shard ``index``'s directory, one thread per file."""
        directory = fmt.shard_dir(self.root, index)
        directory.mkdir(parents=True, exist_ok=True)
        threads = min(WRITE_THREADS, len(named))
        if threads <= 1:
            return {name: _save_npy(directory / name, array) for name, array in named}
        with ThreadPoolExecutor(threads, thread_name_prefix="crosscoders-shard") as pool:
            futures = [(name, pool.submit(_save_npy, directory / name, array))
                       for name, array in named]
            return {name: future.result() for name, future in futures}

    @contextmanager
    def _disk_errors(self, index: int) -> Iterator[None]:
        try:
            yield
        except OSError as err:
            _raise_if_disk_full(err, f"shard {index} of {self.root}",
                                "; the harvest resumes after the last complete shard")
            raise

    def _save_progress(self) -> None:
        write_json(self.root / fmt.PROGRESS, self.progress, indent=None)

    def _clean_temp_files(self) -> None:
        """Remove half-written files left by a killed process (atomic_write's temp names)."""
        shards = self.root / fmt.SHARDS_DIR
        if shards.exists():
            for tmp in shards.glob("*/.*.tmp"):
                tmp.unlink(missing_ok=True)
        for tmp in self.root.glob(".*.tmp") if self.root.exists() else []:
            tmp.unlink(missing_ok=True)


class BackgroundCommits:
    """Commits shards behind the caller: a pool of threads writes the files of up to
    ``depth + 1`` shards at once, and one thread records the shards in the order submitted.

    ``submit`` blocks while ``depth`` shards wait to be recorded, which bounds the memory they
    hold. The first error (of a write or a record, in shard order) is raised again in the
    caller by the next ``submit`` or by ``close``; later shards are dropped. ``stop`` drops
    the shards not yet written and waits for the running writes.
    """

    def __init__(self, depth: int) -> None:
        depth = max(1, depth)
        self._pool = ThreadPoolExecutor(depth + 1, thread_name_prefix="crosscoders-write")
        self._pending: queue.Queue[tuple[Future, Callable[[Any], None]] | None] = queue.Queue(
            maxsize=depth
        )
        self._error: BaseException | None = None
        self._cancel = False
        self._stopped = False
        self._thread = threading.Thread(target=self._record, name="crosscoders-commit",
                                        daemon=True)
        self._thread.start()

    def _live(self) -> bool:
        return self._error is None and not self._cancel

    def _write(self, write: Callable[[], T]) -> T | None:
        return write() if self._live() else None  # a dropped shard is not written

    def _record(self) -> None:
        while (item := self._pending.get()) is not None:
            future, record = item
            try:
                result = future.result()
                if self._live():
                    record(result)
            except BaseException as err:  # noqa: BLE001 - handed to the caller's thread
                if self._live():
                    self._error = err

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def submit(self, write: Callable[[], T], record: Callable[[T], None]) -> None:
        """Run ``write()`` on the pool, then ``record(its result)`` after every shard
        submitted before; raise the error of an earlier shard if one failed."""
        self._raise()
        future = self._pool.submit(self._write, write)
        while True:
            try:
                self._pending.put((future, record), timeout=1.0)
                return
            except queue.Full:
                self._raise()
                if not self._thread.is_alive():  # pragma: no cover - it only stops on close
                    raise CrosscodersError("internal error: the store commit thread died") from None

    def close(self) -> None:
        """Wait until every submitted shard is written and recorded; raise the first error."""
        self._finish()
        self._raise()

    def stop(self) -> None:
        """Drop the shards not yet started, wait for the running writes; never raises."""
        self._cancel = True
        self._finish()

    def _finish(self) -> None:
        if not self._stopped:
            self._stopped = True
            self._pending.put(None)  # the recorder keeps taking shards: this does not stall
        self._thread.join()
        self._pool.shutdown(wait=True, cancel_futures=self._cancel)
