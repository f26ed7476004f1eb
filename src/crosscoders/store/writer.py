"""Write an activation store shard by shard, so that a killed harvest resumes exactly.

Every file is written beside its target and renamed into place (``crosscoders.io``), then
``progress.json`` is rewritten to record it. A shard counts only once ``progress.json``
lists it, so a kill at any moment loses at most the shard being written. ``manifest.json``
is written last: a store without it is never opened as complete.
"""

from __future__ import annotations

import errno
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from crosscoders.errors import ConfigError, CrosscodersError
from crosscoders.io import atomic_write, atomic_write_text
from crosscoders.store import format as fmt


@dataclass
class ShardMeta:
    """Model-independent part of a shard: which tokens it holds and where they came from."""

    rows: np.ndarray  # [n] fmt.ROW_DTYPE
    contexts: np.ndarray  # [m, T] int32, -1 = padding
    seq_start: int  # global index of the first context in the shard
    seq_end: int  # one past the last context
    masked: dict[str, int] = field(default_factory=dict)


def _save_npy(path: Path, array: np.ndarray) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as handle:
            np.save(handle, array, allow_pickle=False)

    atomic_write(path, write)


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
            self.progress = json.loads(progress_path.read_text())
        elif self.complete:
            self.progress = json.loads((self.root / fmt.MANIFEST).read_text())
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
    ) -> None:
        """Write shard ``index`` for ``group`` (its sources' [n, D] arrays) and record it."""
        if self.done(group) != index:
            raise CrosscodersError(
                f"internal error: group {group} commits shard {index} but has {self.done(group)}"
            )
        directory = fmt.shard_dir(self.root, index)
        try:
            directory.mkdir(parents=True, exist_ok=True)
            record = self.shard(index)
            if record is None:
                if index != self.n_shards_known:
                    raise CrosscodersError(f"internal error: shard {index} written out of order")
                record = {
                    "index": index,
                    "n_tokens": int(len(meta.rows)),
                    "n_contexts": int(meta.seq_end - meta.seq_start),
                    "seq_start": int(meta.seq_start),
                    "seq_end": int(meta.seq_end),
                    "masked": dict(meta.masked),
                    "files": {},
                }
                self._write(directory, "rows.npy", meta.rows, record)
                self._write(directory, "contexts.npy", meta.contexts, record)
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
            for source, array in sorted(acts.items()):
                if array.shape != (len(meta.rows), self.d_model):
                    raise CrosscodersError(
                        f"internal error: source {source} shard {index} has shape {array.shape}"
                    )
                stats = np.empty(self.d_model + 1, dtype=np.float64)
                x = fmt.to_float32(array, self.dtype).double()
                stats[:-1] = x.sum(0).numpy()
                stats[-1] = float((x * x).sum())
                self._write(directory, fmt.acts_name(source), array, record)
                self._write(directory, fmt.stats_name(source), stats, record)
            shards = self.progress["shards"]
            if index == len(shards):
                shards.append(record)
            self.progress["done"][group] = index + 1
            self._save_progress()
        except OSError as err:
            _raise_if_disk_full(err, f"shard {index} of {self.root}",
                                "; the harvest resumes after the last complete shard")
            raise

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
            atomic_write_text(self.root / fmt.MANIFEST, json.dumps(manifest, indent=1) + "\n")
        except OSError as err:
            _raise_if_disk_full(err, f"the manifest of {self.root}")
            raise
        self.complete = True
        return manifest

    # -- helpers ---------------------------------------------------------------------------
    def _write(self, directory: Path, name: str, array: np.ndarray, record: dict) -> None:
        path = directory / name
        _save_npy(path, array)
        record["files"][name] = {"sha256": fmt.sha256_file(path), "bytes": path.stat().st_size}

    def _save_progress(self) -> None:
        atomic_write_text(self.root / fmt.PROGRESS, json.dumps(self.progress) + "\n")

    def _clean_temp_files(self) -> None:
        """Remove half-written files left by a killed process (atomic_write's temp names)."""
        shards = self.root / fmt.SHARDS_DIR
        if shards.exists():
            for tmp in shards.glob("*/.*.tmp"):
                tmp.unlink(missing_ok=True)
        for tmp in self.root.glob(".*.tmp") if self.root.exists() else []:
            tmp.unlink(missing_ok=True)
