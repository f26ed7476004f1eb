"""On-disk layout of an activation store: file names, dtypes, checksums.

A store is a directory::

    manifest.json            written last; its presence marks a complete store
    progress.json            harvest bookkeeping (committed shards), used to resume
    harvest_config.json      the config that produced the store
    shards/00000/acts_0.npy  [n, D] activations of source 0 (one file per source)
    shards/00000/rows.npy    [n] structured row metadata (token, context, position, doc, ...)
    shards/00000/contexts.npy [m, T] int32 token ids of the m model inputs (-1 = padding)
    shards/00000/stats_0.npy [D + 1] float64: sum of x and sum of ||x||^2 of source 0

Activations are plain ``.npy`` files so they can be memory-mapped; bfloat16 is stored as its
raw 16-bit pattern (``uint16``) because numpy has no bfloat16.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import torch

FORMAT_NAME = "crosscoders-activation-store"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PROGRESS = "progress.json"
CONFIG = "harvest_config.json"
SHARDS_DIR = "shards"

STORE_DTYPES = ("float32", "float16", "bfloat16")
_NUMPY_STORAGE = {
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "bfloat16": np.dtype("<u2"),
}
_TORCH = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# One record per stored token (row). Inserted tokens (context BOS) have doc = -1.
ROW_DTYPE = np.dtype(
    [
        ("token", "<i4"),  # token id
        ("context", "<i8"),  # global index of the model input (context) the token was in
        ("position", "<i4"),  # position inside that context
        ("doc", "<i8"),  # global index of the document in the (mixed) text stream
        ("doc_pos", "<i4"),  # token position inside the document
        ("dataset", "<i2"),  # index into the config's data list
    ]
)


def storage_dtype(name: str) -> np.dtype:
    """numpy dtype used on disk for a store dtype name."""
    return _NUMPY_STORAGE[name]


def torch_dtype(name: str) -> torch.dtype:
    return _TORCH[name]


def to_storage(x: torch.Tensor, name: str) -> np.ndarray:
    """Cast a tensor to the store dtype and return its numpy view on CPU (bf16 as uint16)."""
    return storage_numpy(x.detach().to(_TORCH[name]).cpu().contiguous())


def storage_numpy(x: torch.Tensor) -> np.ndarray:
    """The numpy view of a CPU tensor already in a store dtype (bf16 as its uint16 bits)."""
    if x.dtype == torch.bfloat16:
        return x.view(torch.int16).numpy().view(np.uint16)
    return x.numpy()


def to_float32(a: np.ndarray, name: str) -> torch.Tensor:
    """Storage array (any shape) -> float32 tensor."""
    return torch.from_numpy(to_float32_numpy(a, name))


def to_float32_numpy(a: np.ndarray, name: str, out: np.ndarray | None = None) -> np.ndarray:
    """Storage array -> float32 numpy array (into ``out`` if given, any strides)."""
    if out is None:
        out = np.empty(a.shape, np.float32)
    if name == "bfloat16":
        # bfloat16 is the top half of a float32: shifting the bits is exact (and much faster
        # on CPU than torch's bf16 -> fp32 conversion).
        np.left_shift(a, 16, out=out.view(np.uint32), dtype=np.uint32)
    else:
        out[...] = a
    return out


def shard_dir(root: Path, index: int) -> Path:
    return root / SHARDS_DIR / f"{index:05d}"


def acts_name(source: int) -> str:
    return f"acts_{source}.npy"


def stats_name(source: int) -> str:
    return f"stats_{source}.npy"


def npy_header(array: np.ndarray) -> bytes:
    """The header ``np.save`` writes before the bytes of a C-contiguous ``array``."""
    header = np.lib.format.header_data_from_array_1_0(array)
    buf = io.BytesIO()
    try:
        np.lib.format.write_array_header_1_0(buf, header)
    except ValueError:  # a header over 64 KiB needs version 2.0, as np.save does
        buf = io.BytesIO()
        np.lib.format.write_array_header_2_0(buf, header)
    return buf.getvalue()


def sha256_file(path: Path, block: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(block):
            digest.update(chunk)
    return digest.hexdigest()
