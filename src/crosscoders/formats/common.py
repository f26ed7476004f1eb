"""Shared pieces of the importers: reading tensors safely, and finishing the model."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from crosscoders.errors import CrosscodersError
from crosscoders.io import read_safetensors, read_torch
from crosscoders.model import Crosscoder, CrosscoderConfig


def read_tensors(path: Path) -> dict[str, Tensor]:
    """A state dict from ``.safetensors`` or a torch pickle (loaded with weights_only,
    memory-mapped so probing a multi-GB checkpoint's keys reads almost nothing)."""
    fix = ("the checkpoint is truncated or not a plain tensor state dict: download or save "
           "it again (only state dicts of tensors are imported)")
    if path.suffix == ".safetensors":
        return read_safetensors(path, fix)
    state = read_torch(path, fix, mmap=True)
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CrosscodersError(
            f"{path} does not hold a state dict of tensors; save model.state_dict(), not the "
            "model or a training checkpoint"
        )
    return state


def require(state: dict[str, Tensor], keys: list[str], path: Path, what: str) -> None:
    missing = [k for k in keys if k not in state]
    if missing:
        raise CrosscodersError(
            f"{path} is missing {', '.join(missing)} for a {what} checkpoint (found: "
            f"{', '.join(sorted(state)[:12])}); pass the right --format, or the checkpoint "
            "file itself"
        )


def build(config: CrosscoderConfig, W_enc_SDF: Tensor, W_dec_FSD: Tensor, b_enc_F: Tensor,
          b_dec_SD: Tensor, imported_from: dict) -> Crosscoder:
    """A crosscoder holding exactly these weights (fp32), with provenance metadata."""
    S, D, F_ = W_enc_SDF.shape
    expected = {"W_dec": (F_, S, D), "b_enc": (F_,), "b_dec": (S, D)}
    got = {"W_dec": tuple(W_dec_FSD.shape), "b_enc": tuple(b_enc_F.shape),
           "b_dec": tuple(b_dec_SD.shape)}
    if got != expected:
        raise CrosscodersError(
            f"inconsistent shapes in {imported_from.get('path')}: with an encoder of shape "
            f"[S={S}, D={D}, F={F_}] expected {expected}, found {got}; the checkpoint is "
            "damaged or mixes two models: download or save it again"
        )
    model = Crosscoder(config)
    with torch.no_grad():
        model.W_enc_FSD.copy_(W_enc_SDF.float().permute(2, 0, 1))
        model.W_dec.copy_(W_dec_FSD.float())
        model.b_enc.copy_(b_enc_F.float())
        model.b_dec.copy_(b_dec_SD.float())
    model.metadata = {"imported_from": imported_from}
    return model.eval()
