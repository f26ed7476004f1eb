"""The dictionary_learning crosscoder forks (science-of-finetuning/crosscoder_learning).

Their ``CrossCoder`` / ``BatchTopKCrossCoder`` state dict:

    encoder.weight [L, D, F]   encoder.bias [F]   decoder.weight [L, F, D]   decoder.bias [L, D]
    code_normalization_id      1 CROSSCODER (sum of per-layer decoder norms), 2 SAE (norm of
                               the concatenation), 3 MIXED, 4 NONE, 5 DECOUPLED
    k, threshold               BatchTopK only; inference keeps relu(pre) where
                               relu(pre) * code_norm > threshold (threshold < 0: never set)
    activation_mean/std [L, D], activation_global_scale [L], target_rms
                               newer versions: inputs are normalised as (x - mean) * scale_l
                               inside encode, and decode undoes it (NaN mean/std: none)

The normaliser is folded into the weights (the scale as our recorded per-source scale, the
mean into both biases), so the imported model works on raw activations and its decoder
norms, code norms and threshold are those of the original.

:func:`export` is the inverse: a ``relu`` or ``batchtopk`` crosscoder becomes a hub directory
their ``CrossCoder`` / ``BatchTopKCrossCoder`` load (``from_pretrained(dir, from_hub=True)``),
with our folded per-source scales written as their normaliser (mean 0, ``scale_l``), so
their decoder norms, code norms and threshold live in the units ours do.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import torch
from torch import Tensor

from crosscoders.errors import CrosscodersError
from crosscoders.formats.common import build, read_tensors, require
from crosscoders.io import atomic_write, write_json
from crosscoders.model import Crosscoder, CrosscoderConfig

CODE_NORMALIZATIONS = {1: "CROSSCODER", 2: "SAE", 3: "MIXED", 4: "NONE", 5: "DECOUPLED"}
_DEC_NORM = {"CROSSCODER": "sum", "SAE": "concat"}
_KEYS = ["encoder.weight", "encoder.bias", "decoder.weight", "decoder.bias"]
_COMPILE_PREFIX = "_orig_mod."


def matches(path: Path) -> bool:
    file = _weights_file(path)
    if file is None or file.suffix not in (".pt", ".pth", ".bin", ".safetensors"):
        return False
    try:
        keys = _peek_keys(file)
    except Exception:  # noqa: BLE001 - not readable: not this format
        return False
    return any(k.endswith("encoder.weight") for k in keys) and any(
        k.endswith("decoder.weight") for k in keys)


def load(path: Path, source_names: list[str] | None = None) -> Crosscoder:
    """Import a CrossCoder / BatchTopKCrossCoder from a hub directory or a state-dict file."""
    file = _weights_file(path)
    if file is None:
        raise CrosscodersError(
            f"{path}: expected model.safetensors (hub layout) or a .pt/.safetensors state dict; "
            "pass the checkpoint directory or file, or --format auto to detect the format"
        )
    state = _strip_compile_prefix(read_tensors(file))
    require(state, _KEYS, file, "dictionary_learning crosscoder")
    hub_config = _hub_config(path)
    W_enc_LDF, b_enc_F = state["encoder.weight"].float(), state["encoder.bias"].float()
    W_dec_LFD, b_dec_LD = state["decoder.weight"].float(), state["decoder.bias"].float()
    L, D, F_ = W_enc_LDF.shape
    if W_dec_LFD.shape[0] != L:
        raise CrosscodersError(
            f"{file}: the decoder writes {W_dec_LFD.shape[0]} layers but the encoder reads {L}; "
            "crosscoders with different input and output layers are not supported"
        )
    code_norm = _code_normalization(state, hub_config, file)
    is_batchtopk = "k" in state and "threshold" in state
    if is_batchtopk and code_norm not in _DEC_NORM:
        raise CrosscodersError(
            f"{file}: BatchTopK with code normalisation {code_norm} cannot be represented "
            "(its selection weights latents by a different decoder norm); supported: "
            "CROSSCODER (sum of per-source norms) and SAE (norm of the concatenation)"
        )
    k = int(state["k"]) if is_batchtopk else None
    config = CrosscoderConfig(
        n_sources=L, d_model=D, dict_size=F_,
        activation="batchtopk" if is_batchtopk else "relu",
        k=k if k is not None else min(32, F_),
        dec_norm=_DEC_NORM.get(code_norm, "sum"),
        source_names=source_names,
    )
    W_dec_FSD = W_dec_LFD.permute(1, 0, 2)
    model = build(config, W_enc_LDF, W_dec_FSD, b_enc_F, b_dec_LD, {
        "format": "dictionary_learning", "path": str(path),
        "class": "BatchTopKCrossCoder" if is_batchtopk else "CrossCoder",
        "code_normalization": code_norm,
    })
    _fold_normaliser(model, state, W_enc_LDF)
    if is_batchtopk:
        threshold = state["threshold"].float()
        if threshold.numel() != 1:
            raise CrosscodersError(
                f"{file}: a per-layer threshold (DECOUPLED) cannot be imported; only one global "
                "threshold is representable"
            )
        with torch.no_grad():
            # theirs: never calibrated (< 0) keeps every positive activation; 0 does that here
            model.activation.threshold.fill_(max(float(threshold), 0.0))
            model.activation.threshold_updates.fill_(1)
    return model


# ---------------------------------------------------------------------------------------


def _weights_file(path: Path) -> Path | None:
    if path.is_file():
        return path
    for name in ("model.safetensors", "model_final.pt", "pytorch_model.bin"):
        if (path / name).exists():
            return path / name
    return None


def _peek_keys(file: Path) -> list[str]:
    if file.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(file), framework="pt") as handle:
            return list(handle.keys())
    return list(read_tensors(file))


def _strip_compile_prefix(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """torch.compile'd models save keys as ``_orig_mod.<key>``."""
    return {k[len(_COMPILE_PREFIX):] if k.startswith(_COMPILE_PREFIX) else k: v
            for k, v in state.items()}


def _hub_config(path: Path) -> dict:
    config_file = path / "config.json" if path.is_dir() else path.parent / "config.json"
    if not config_file.exists():
        return {}
    try:
        config = json.loads(config_file.read_text())
    except ValueError:
        return {}
    # a training run's config.json nests the model settings under "trainer"
    return config.get("trainer", config) if isinstance(config, dict) else {}


def _code_normalization(state: dict[str, Tensor], hub_config: dict, file: Path) -> str:
    if "code_normalization_id" in state:
        code_id = int(state["code_normalization_id"])
        if code_id not in CODE_NORMALIZATIONS:
            raise CrosscodersError(
                f"{file}: unknown code_normalization_id {code_id}; known: "
                f"{', '.join(f'{k} {v}' for k, v in CODE_NORMALIZATIONS.items())}"
            )
        return CODE_NORMALIZATIONS[code_id]
    name = str(hub_config.get("code_normalization", "CROSSCODER")).upper()
    if name not in CODE_NORMALIZATIONS.values():
        raise CrosscodersError(
            f"{file}: unknown code_normalization {name!r} in config.json; use one of "
            f"{', '.join(CODE_NORMALIZATIONS.values())}"
        )
    return name  # their loader also defaults to CROSSCODER when the id is missing


def _fold_normaliser(model: Crosscoder, state: dict[str, Tensor], W_enc_LDF: Tensor) -> None:
    """Fold ``(x - mean) * scale`` into the weights (no-op without a normaliser)."""
    mean_LD, std_LD = state.get("activation_mean"), state.get("activation_std")
    scale_L = state.get("activation_global_scale")
    if mean_LD is None or std_LD is None or scale_L is None:
        return
    if bool(torch.isnan(mean_LD).any()) or bool(torch.isnan(std_LD).any()):
        return  # their convention: NaN statistics mean "no normaliser"
    mean_LD, scale_L = mean_LD.float(), scale_L.float().reshape(-1)
    with torch.no_grad():
        # sum_l ((x_l - mu_l) s_l) @ W_l + b = sum_l x_l @ (s_l W_l) + (b - sum_l s_l mu_l @ W_l)
        shift_F = torch.einsum("ld,ldf->f", mean_LD * scale_L[:, None], W_enc_LDF)
        model.b_enc.sub_(shift_F)
        model.fold_normalisation(scale_L)  # W_enc * s, W_dec / s, b_dec / s; s recorded
        model.b_dec.add_(mean_LD)  # decode: y / s + mu
    model.metadata["imported_from"]["normaliser"] = {
        "target_rms": float(state["target_rms"]) if "target_rms" in state else None,
        "scale": scale_L.tolist(),
        "mean_folded_into_biases": True,
    }


# ------------------------------------------------------------------------------- export

_CODE_NORMALIZATION_ID = {"sum": 1, "concat": 2}  # CROSSCODER, SAE


def check_export(model: Crosscoder) -> None:
    """Refuse, naming the reason, a crosscoder their classes cannot reproduce exactly."""
    c = model.config
    if c.activation == "topk":
        raise CrosscodersError(
            "dictionary_learning has no per-token TopK crosscoder (only CrossCoder, ReLU, and "
            "BatchTopKCrossCoder), so this topk crosscoder cannot be exported exactly; keep "
            "it in this package's format (push it with `crosscoders push`)")
    if c.activation == "jumprelu":
        raise CrosscodersError(
            "dictionary_learning has no JumpReLU crosscoder, so this jumprelu crosscoder "
            "cannot be exported exactly; use --format crosscode, which has one")
    if c.activation == "batchtopk" and not model.activation.has_threshold:
        raise CrosscodersError(
            "this batchtopk crosscoder has no inference threshold yet (it was never trained): "
            "dictionary_learning would keep every positive latent where this package keeps "
            "each token's top k; train it first, then export")


def export(model: Crosscoder, out: Path) -> None:
    """Write ``config.json`` + ``model.safetensors`` in their hub layout to ``out``."""
    from safetensors.torch import save_file

    check_export(model)
    c = model.config
    unfolded = copy.deepcopy(model).cpu().float()
    folded = unfolded.is_folded
    scale_L = unfolded.unfold_normalisation() if folded else torch.ones(c.n_sources)
    L, D = c.n_sources, c.d_model
    state = {
        "encoder.weight": unfolded.W_enc.detach(),  # [L, D, F] in normalised units
        "encoder.bias": unfolded.b_enc.detach(),
        "decoder.weight": unfolded.W_dec.detach().permute(1, 0, 2),  # [L, F, D]
        "decoder.bias": unfolded.b_dec.detach(),
        "code_normalization_id": torch.tensor(_CODE_NORMALIZATION_ID[c.dec_norm]),
    }
    if folded:
        # theirs: (x - mean) * scale_l with scale_l = target_rms / sqrt(sum_d std^2 + 1e-8);
        # ours is an uncentred scale, so mean 0 and a std that gives back exactly scale_l
        target_rms = math.sqrt(D)
        var_L = (target_rms**2 / scale_L.double() ** 2 - 1e-8).clamp_min(0) / D
        state.update({
            "activation_mean": torch.zeros(L, D),
            "activation_std": var_L.sqrt().float()[:, None].expand(L, D),
            "activation_global_scale": scale_L.float(),
            "target_rms": torch.tensor(target_rms),
        })
    else:  # their convention for "no normaliser": NaN statistics, unit scale
        state.update({
            "activation_mean": torch.full((L, D), math.nan),
            "activation_std": torch.full((L, D), math.nan),
            "activation_global_scale": torch.ones(L),
            "target_rms": torch.tensor(1.0),
        })
    config = {"activation_dim": D, "dict_size": c.dict_size, "num_layers": L,
              "code_normalization": CODE_NORMALIZATIONS[_CODE_NORMALIZATION_ID[c.dec_norm]]}
    if c.activation == "batchtopk":
        state["k"] = torch.tensor(c.k, dtype=torch.int32)
        state["threshold"] = torch.tensor(float(model.activation.threshold),
                                          dtype=torch.float32)
        config.update(k=c.k, dict_class="BatchTopKCrossCoder")
    else:
        config["dict_class"] = "CrossCoder"
    tensors = {k: v.detach().float().contiguous().clone() if v.is_floating_point()
               else v.contiguous().clone() for k, v in state.items()}
    atomic_write(out / "model.safetensors", lambda tmp: save_file(tensors, tmp))
    write_json(out / "config.json", config)
