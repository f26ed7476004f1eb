"""Stage bookkeeping: a stage whose inputs and config are unchanged is not redone.

Beside the stage directories, ``stages/<stage>.json`` holds the hash of the stage's config together
with the hashes of the stages it read from, whether the stage finished, and (once it has) every
path it wrote. A finished stage with the same hash is skipped; an unfinished one is resumed
(harvest and training resume themselves); a stage whose hash changed is redone from scratch, and
the keys that changed are printed.

Nothing the pipeline did not write is deleted. A stage directory without a record (made by a
stand-alone command, or anything else) is refused unless it is empty; a finished stage that must
be redone is refused while its directory holds a path the stage did not write. A redo is safe
against a kill: the old output is first renamed to ``stages/<stage>.discarded`` (one atomic
step), then the new record is written, then the old output is deleted; a kill at any point leaves
either the old output with its record, or the new run to be resumed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crosscoders.errors import CrosscodersError
from crosscoders.io import write_json

STAGE_DIR = "stages"
DISCARDED = ".discarded"  # suffix of a stage's old output while it is being deleted


def config_hash(config: Any, upstream: list[str]) -> str:
    text = json.dumps({"config": config, "upstream": upstream}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def changed_keys(old: Any, new: Any) -> list[str]:
    """``key: old -> new`` lines for every leaf that differs."""
    a, b = _flatten(old), _flatten(new)
    return [f"{k}: {a.get(k, '<unset>')!r} -> {b.get(k, '<unset>')!r}"
            for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


@dataclass
class StageOutcome:
    name: str
    directory: Path
    hash: str
    status: str  # "skipped" | "ran" | "resumed" | "redone" | "reused"
    result: Any = None


def read_record(out: Path, name: str) -> dict[str, Any] | None:
    """The record of stage ``name`` in the experiment directory ``out`` (None if none)."""
    path = out / STAGE_DIR / f"{name}.json"
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CrosscodersError(
            f"stage record {path} is corrupt ({err}); delete it and move the {name} stage's "
            "directory away, then run again"
        ) from None
    if not isinstance(record, dict) or "hash" not in record:
        raise CrosscodersError(f"{path} is not a stage record; move it out of {path.parent}")
    return record


def is_stage_entry(path: Path) -> bool:
    """Whether ``path`` (inside ``stages/``) is something :func:`run_stage` writes."""
    if path.name.endswith(DISCARDED) or (path.name.startswith(".") and path.suffix == ".tmp"):
        return True  # an old output being deleted; a temporary file of an atomic write
    if path.suffix != ".json" or not path.is_file():
        return False
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(record, dict) and {"stage", "hash"} <= set(record)


def listing(directory: Path) -> list[str]:
    """Every path under ``directory`` (files, folders, links; links not followed), sorted."""
    out = []
    for root, dirs, files in os.walk(directory):
        rel = Path(root).relative_to(directory)
        out.extend((rel / name).as_posix() for name in dirs + files)
    return sorted(out)


def run_stage(
    name: str,
    directory: Path,
    config: Any,
    upstream: list[str],
    work: Callable[[Path], Any],
    log: Callable[[str], None] = print,
    load: Callable[[Path], Any] | None = None,
) -> StageOutcome:
    """Run ``work(directory)`` unless a finished run with the same hash is there."""
    digest = config_hash(config, upstream)
    records = directory.parent / STAGE_DIR
    record_path = records / f"{name}.json"
    discarded = records / f"{name}{DISCARDED}"
    if discarded.exists():  # a redo was killed while deleting the old output
        shutil.rmtree(discarded)
    record = read_record(directory.parent, name)
    present = directory.exists() or directory.is_symlink()
    status = "ran"
    if record is not None and record.get("hash") == digest and present:
        if record.get("complete"):
            log(f"{name}: up to date ({directory})")
            return StageOutcome(name, directory, digest, "skipped",
                                load(directory) if load else None)
        log(f"{name}: resuming the interrupted run in {directory}")
        status = "resumed"
    elif record is not None and record.get("hash") == digest:
        log(f"{name}: running again, because {directory} is missing")
    elif record is not None:
        reasons = changed_keys(record.get("config"), config)
        if record.get("upstream") != upstream:
            reasons.append("an earlier stage was redone")
        if present:
            _check_own(name, directory, record)
        log(f"{name}: redoing, because " + "; ".join(reasons or ["its inputs changed"]))
        if present:
            records.mkdir(parents=True, exist_ok=True)
            os.rename(directory, discarded)
        status = "redone"
    else:
        if present and not _is_empty_dir(directory):
            raise CrosscodersError(
                f"{directory} was not written by `crosscoders run` (it has no record in "
                f"{records}); move it away or choose another out: directory"
            )
        log(f"{name}: running")
    entry = {"stage": name, "hash": digest, "upstream": upstream, "config": config}
    if status != "resumed":
        _write(record_path, {**entry, "complete": False})
    if discarded.exists():
        shutil.rmtree(discarded)
    directory.mkdir(parents=True, exist_ok=True)
    result = work(directory)
    _write(record_path, {**entry, "complete": True, "files": listing(directory)})
    return StageOutcome(name, directory, digest, status, result)


def _is_empty_dir(path: Path) -> bool:
    """An empty folder, or a link to one (to put a stage's output on another disk)."""
    return path.is_dir() and not any(path.iterdir())


def _check_own(name: str, directory: Path, record: dict[str, Any]) -> None:
    """Refuse to redo a stage whose directory holds anything the stage did not write.

    An unfinished stage's directory holds only its interrupted work (it was empty when the
    stage started); a record written before file lists were kept vouches for the whole
    directory.
    """
    if directory.is_symlink() or not directory.is_dir():
        raise CrosscodersError(
            f"{name} must be redone but {directory} is a link or a file, which `crosscoders run` "
            "does not delete; remove it yourself, then run again"
        )
    if not record.get("complete") or "files" not in record:
        return
    foreign = sorted(set(listing(directory)) - set(record["files"]))
    if foreign:
        more = f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""
        raise CrosscodersError(
            f"{name} must be redone but {directory / foreign[0]}{more} was not written by "
            f"`crosscoders run`; move it out of {directory}, then run again"
        )


def _write(path: Path, record: dict) -> None:
    write_json(path, record, default=str)
