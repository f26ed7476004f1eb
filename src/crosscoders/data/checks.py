"""Checks of activation data: shape and dtype, NaN/inf in one streaming pass, a content hash."""

from __future__ import annotations

import hashlib

import numpy as np
import torch
from torch import Tensor

from crosscoders.errors import DataError


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


def check_batch_finite(x: Tensor, what: str) -> None:
    """Refuse NaN/inf in one batch read from a source checked batch by batch (an iterable)."""
    count, rows, first = find_nonfinite(x)
    if count:
        raise DataError(
            f"{what} contain {count} NaN or inf value(s) in {rows} token(s), the first at row "
            f"{first} of the batch; clean or drop those tokens before training"
        )
