"""Files on disk: atomic writes that honour the umask, output paths checked before any work,
and readers that turn a damaged file into one clear :class:`CrosscodersError`."""

from __future__ import annotations

import errno
import json
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

from crosscoders.errors import CrosscodersError, DataError

# ------------------------------------------------------------------------------- paths


def file_in_the_way(path: str | Path) -> Path | None:
    """The first of ``path``'s ancestors that exists and is not a directory, if any: a
    directory cannot be created below it."""
    for parent in reversed(Path(path).absolute().parents):
        if parent.exists() and not parent.is_dir():
            return parent
    return None


def check_dir_path(path: str | Path, what: str = "--out") -> Path:
    """Refuse an output directory that cannot be one (a file, or below a file); no side
    effects, so commands can call it before any work."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CrosscodersError(
            f"{what} {path} is a file, not a directory; give a directory path (new or "
            "existing), or move the file away"
        )
    _refuse_below_a_file(path, what, "created")
    return path


def check_file_path(path: str | Path, what: str = "--out") -> Path:
    """Refuse an output file path that is a directory or lies below a file."""
    path = Path(path)
    if path.is_dir():
        raise CrosscodersError(
            f"{what} {path} is a directory; give a file path, e.g. {path / 'out'}"
        )
    _refuse_below_a_file(path, what, "written")
    return path


def _refuse_below_a_file(path: Path, what: str, done: str) -> None:
    blocker = file_in_the_way(path)
    if blocker is not None:
        raise CrosscodersError(
            f"{what} {path} cannot be {done}: {blocker} is a file, not a directory; choose "
            "another path"
        )


def ensure_dir(path: str | Path, what: str = "output directory") -> Path:
    """``mkdir -p`` that names the file in the way instead of raising FileExistsError."""
    path = check_dir_path(path, what)
    path.mkdir(parents=True, exist_ok=True)
    return path


# ------------------------------------------------------------------------------- writing


def _create_temp(directory: Path, name: str) -> str:
    """A new empty file beside the target, created with mode 0o666 so the kernel applies
    the umask exactly as for any other tool's output (tempfile.mkstemp would give 0o600,
    and reading the umask with os.umask() would briefly change it for every thread)."""
    for _ in range(100):
        tmp = str(directory / f".{name}.{secrets.token_hex(4)}.tmp")
        try:
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(errno.EEXIST, "no free temporary file name", str(directory))


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` then atomically move the result to ``path``.

    A crash at any moment leaves either the old file or the new one, never a partial file.
    The result gets the permissions a plain ``open(path, "w")`` would (0o666 minus the
    umask), even if ``write`` replaced the temporary file with one of its own.
    """
    path = Path(path)
    check_file_path(path, "output file")
    ensure_dir(path.parent)
    tmp = _create_temp(path.parent, path.name)
    mode = os.stat(tmp).st_mode & 0o777  # the umask as the kernel applied it, race free
    try:
        write(tmp)
        os.chmod(tmp, mode)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as handle:
            handle.write(text)

    atomic_write(path, write)


def write_json(path: str | Path, obj: Any, **dumps_kwargs: Any) -> None:
    """Write ``obj`` as JSON (``indent=2`` unless given) with a trailing newline, atomically.

    ``dumps_kwargs`` go to :func:`json.dumps` (e.g. ``default=str`` for values JSON lacks).
    """
    atomic_write_text(path, json.dumps(obj, **{"indent": 2, **dumps_kwargs}) + "\n")


def json_default(value: Any) -> Any:
    """``default=`` for :func:`write_json` where results hold numpy or torch values: scalars
    as numbers, arrays and tensors as lists, anything else as its ``str``."""
    if hasattr(value, "tolist"):  # numpy scalars and arrays, torch tensors
        return value.tolist()
    return str(value)


# ------------------------------------------------------------------------------- reading


def brief(err: BaseException, limit: int = 160) -> str:
    """A library exception as one short line: ``Type: first line of the message``."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def unreadable(path: str | Path, kind: str, err: BaseException, fix: str) -> DataError:
    """The error for a file that exists but cannot be parsed as ``kind``."""
    return DataError(f"{path} could not be read as {kind} ({brief(err)}); {fix}")


def _require_file(path: Path) -> None:
    if not path.exists():
        raise DataError(f"{path} does not exist; check the path")
    if path.is_dir():
        raise DataError(f"{path} is a directory; give the file itself")


def read_json(path: str | Path, fix: str = "it is damaged: write it again") -> Any:
    """Parse a JSON file; a damaged one raises DataError naming it and ``fix``."""
    path = Path(path)
    _require_file(path)
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise unreadable(path, "JSON", err, fix) from None


def read_table(path: str | Path, fix: str = "it is damaged: write it again") -> Any:
    """A Parquet (``.parquet``) or CSV table as a pandas DataFrame; a damaged one raises
    DataError naming it and ``fix``."""
    import pandas as pd

    path = Path(path)
    read = pd.read_parquet if path.suffix == ".parquet" else pd.read_csv
    try:
        return read(path)
    except (ValueError, OSError) as err:  # pyarrow's ArrowInvalid is a ValueError
        raise unreadable(path, f"a {path.suffix.lstrip('.')} table", err, fix) from None


def read_safetensors(path: str | Path, fix: str | None = None) -> dict[str, Any]:
    """Every tensor of a ``.safetensors`` file; a truncated or foreign file raises DataError."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    _require_file(path)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise unreadable(path, "safetensors", err, fix or (
            "the file is truncated or not a safetensors file: write it again, e.g. "
            "safetensors.torch.save_file({'activations': x}, path)")) from None


def read_torch(path: str | Path, fix: str | None = None, mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` on CPU; an unreadable file raises DataError.

    ``mmap``: memory-map it where the file format allows (legacy files are read whole).
    """
    import torch

    path = Path(path)
    _require_file(path)
    try:
        if mmap:
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # legacy (non-zip) torch files cannot be mapped
                pass
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - unpickling fails in many ways, all mean the same
        raise unreadable(path, "a torch file", err, fix or (
            "the file is truncated, not a torch file, or holds Python objects other than "
            "tensors: write it again, e.g. torch.save(x, path)")) from None


def read_npy(path: str | Path, fix: str | None = None, mmap: bool = True) -> Any:
    """A ``.npy`` array (memory-mapped by default); an unreadable file raises DataError."""
    import numpy as np

    path = Path(path)
    _require_file(path)
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise unreadable(path, ".npy", err, fix or (
            "the file is truncated or holds objects rather than numbers: write it again, "
            "e.g. numpy.save(path, x.astype('float32'))")) from None
