"""Stage bookkeeping: a stage whose inputs and config are unchanged is not redone.

Beside the stage directories, ``stages/<stage>.json`` holds the hash of the stage's config together
with the hashes of the stages it read from, and whether the stage finished. A finished
stage with the same hash is skipped; an unfinished one is resumed (harvest and training
resume themselves); a stage whose hash changed is redone from scratch, and the keys that
changed are printed.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crosscoders.io import atomic_write_text

STAGE_DIR = "stages"


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
    status: str  # "skipped" | "ran" | "resumed" | "redone"
    result: Any = None


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
    record_path = directory.parent / STAGE_DIR / f"{name}.json"
    status = "ran"
    record = json.loads(record_path.read_text()) if record_path.exists() else None
    if record is not None and record.get("hash") == digest:
        if record.get("complete"):
            log(f"{name}: up to date ({directory})")
            return StageOutcome(name, directory, digest, "skipped",
                                load(directory) if load else None)
        log(f"{name}: resuming the interrupted run in {directory}")
        status = "resumed"
    elif record is not None or directory.exists():
        if record is None:
            reasons = [f"{directory} was not made by this pipeline"]
        else:
            reasons = changed_keys(record.get("config"), config)
            if record.get("upstream") != upstream:
                reasons.append("an earlier stage was redone")
        log(f"{name}: redoing, because " + "; ".join(reasons or ["its inputs changed"]))
        if directory.is_dir():
            shutil.rmtree(directory)
        elif directory.exists():
            directory.unlink()
        status = "redone"
    else:
        log(f"{name}: running")
    record_path.parent.mkdir(parents=True, exist_ok=True)
    directory.mkdir(parents=True, exist_ok=True)
    entry = {"stage": name, "hash": digest, "upstream": upstream, "config": config}
    _write(record_path, {**entry, "complete": False})
    result = work(directory)
    _write(record_path, {**entry, "complete": True})
    return StageOutcome(name, directory, digest, status, result)


def _write(path: Path, record: dict) -> None:
    atomic_write_text(path, json.dumps(record, indent=2, default=str) + "\n")
