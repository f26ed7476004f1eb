"""Activation files: one float tensor [N, S, D] in .safetensors, .pt or .npy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from torch import Tensor

from crosscoders.errors import DataError


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
