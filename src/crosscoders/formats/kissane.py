"""ckkissane/crosscoder-model-diff-replication (the Gemma-2-2b base vs IT crosscoder).

Files: ``cfg.json`` (its training config: ``d_in``, ``dict_size``, ``hook_point``, ...) and
``cc_weights.pt`` (a local run saves ``{i}.pt`` and ``{i}_cfg.json``) holding

    W_enc [2, D, F]   W_dec [F, 2, D]   b_enc [F]   b_dec [2, D]

with ``f = relu(sum_m x_m @ W_enc[m] + b_enc)`` and ``xhat_m = f @ W_dec[:, m] + b_dec[m]``:
our layout and our ReLU crosscoder with the sum-of-norms penalty. It was trained on
inputs multiplied by ``s_m = sqrt(D) / mean ||x_m||`` per model, and those factors are not
saved: pass them as ``scale`` (or let ``scale_from`` estimate them from raw activations the
same way) to get a model that works on raw activations; without them the model expects
inputs already scaled.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from crosscoders.errors import CrosscodersError
from crosscoders.formats.common import build, read_tensors, require
from crosscoders.model import Crosscoder, CrosscoderConfig

_KEYS = ["W_enc", "W_dec", "b_enc", "b_dec"]


def matches(path: Path) -> bool:
    file = _weights_file(path)
    if file is None:
        return False
    try:
        state = read_tensors(file)
    except CrosscodersError:
        return False
    return set(_KEYS) <= set(state) and state["W_enc"].ndim == 3 and state["W_dec"].ndim == 3 \
        and state["W_dec"].shape[0] == state["W_enc"].shape[2]


def load(path: Path, scale: list[float] | Tensor | None = None,
         scale_from: Tensor | np.ndarray | str | Path | None = None,
         source_names: list[str] | None = None) -> Crosscoder:
    """Import a Kissane-format crosscoder; ``scale`` [S] or ``scale_from`` [N, S, D] raw
    activations give the normalisation factors to fold in."""
    file = _weights_file(path)
    if file is None:
        raise CrosscodersError(
            f"{path}: expected cc_weights.pt (or a .pt state dict); pass the Kissane "
            "checkpoint directory or file, or --format auto to detect the format"
        )
    state = read_tensors(file)
    require(state, _KEYS, file, "Kissane crosscoder")
    W_enc_SDF = state["W_enc"].float()
    S, D, F_ = W_enc_SDF.shape
    cfg = _cfg(path, file)
    config = CrosscoderConfig(n_sources=S, d_model=D, dict_size=F_, activation="relu",
                              k=min(32, F_), dec_norm="sum", source_names=source_names)
    model = build(config, W_enc_SDF, state["W_dec"], state["b_enc"], state["b_dec"], {
        "format": "kissane", "path": str(path), "cfg": cfg,
    })
    if scale is not None and scale_from is not None:
        raise CrosscodersError("pass either scale or scale_from, not both")
    if scale_from is not None:
        scale = estimate_scale(scale_from)
    if scale is None:
        warnings.warn(
            f"{path}: no normalisation factors given, so the imported crosscoder expects "
            "inputs multiplied by s = sqrt(d_model) / mean ||x|| per model; pass scale=[...] "
            "or scale_from=<raw activations> to fold them in", stacklevel=3,
        )
        model.metadata["imported_from"]["normalisation"] = "not folded (factors unknown)"
        return model
    scale_S = torch.as_tensor(scale, dtype=torch.float32).reshape(-1)
    if scale_S.numel() != S or not bool(torch.all(scale_S > 0)):
        raise CrosscodersError(
            f"scale must hold {S} positive factors (one per model), got {scale_S.tolist()}"
        )
    model.fold_normalisation(scale_S)
    model.metadata["imported_from"]["normalisation"] = {"scale": scale_S.tolist()}
    return model


def estimate_scale(acts: Tensor | np.ndarray | str | Path) -> Tensor:
    """Kissane's factors from raw activations [N, S, D]: ``sqrt(D) / mean_n ||x_n,s||``."""
    from crosscoders.data import load_activation_file

    if isinstance(acts, (str, Path)):
        acts = load_activation_file(acts)
    x_NSD = torch.as_tensor(np.asarray(acts)) if not isinstance(acts, Tensor) else acts
    if x_NSD.ndim != 3 or x_NSD.shape[0] == 0:
        raise CrosscodersError(
            f"scale_from needs raw activations of shape [N, S, D] with N > 0, got "
            f"{tuple(x_NSD.shape)}"
        )
    mean_norm_S = torch.linalg.vector_norm(x_NSD.float(), dim=-1).mean(0)
    return math.sqrt(x_NSD.shape[-1]) / mean_norm_S


def _weights_file(path: Path) -> Path | None:
    if path.is_file():
        return path if path.suffix in (".pt", ".pth") else None
    file = path / "cc_weights.pt"
    return file if file.exists() else None


def _cfg(path: Path, file: Path) -> dict:
    candidates = [path / "cfg.json"] if path.is_dir() else [
        file.with_name(f"{file.stem}_cfg.json"), file.with_name("cfg.json")]
    for candidate in candidates:
        if candidate.exists():
            try:
                return json.loads(candidate.read_text())
            except ValueError:
                raise CrosscodersError(
                    f"{candidate} is not valid JSON; fix it, or move it away to import without it"
                ) from None
    return {}
