"""oli-clive-griffin's ``crosscode`` (model-diffing): ``model_cfg.yaml`` + ``model.pt``.

Its ``ModelHookpointAcausalCrosscoder`` reads and writes M models x P hookpoints:

    _W_enc_XiDiL [M, P, D, F]   b_enc_L [F]   _W_dec_LXoDo [F, M, P, D]   _b_dec_XoDo [M, P, D]
    folded_scaling_factors_in_Xi / _out_Xo [M, P], is_folded (checkpoints saved by its trainer
    are folded: they already work on raw activations)

Our sources are the (model, hookpoint) pairs in row-major order. Imported activations:
``ReLUActivation``, and ``AnthropicSTEJumpReLUActivation`` (``pre * (pre > exp(log_threshold))``,
the same as ours). Its ``TopkActivation`` and ``BatchTopkActivation`` rank raw
pre-activations (no ReLU, no decoder-norm weighting) and its BatchTopK has no inference
threshold, so they have no exact equivalent here and are refused.
"""

from __future__ import annotations

from pathlib import Path

import torch

from crosscoders.errors import CrosscodersError
from crosscoders.formats.common import build, read_tensors, require
from crosscoders.model import Crosscoder, CrosscoderConfig

_JUMPRELU = ("AnthropicSTEJumpReLUActivation", "JumpReLUActivationFunction",
             "AnthropicJumpReLUActivation", "JumpReLUActivation")


def matches(path: Path) -> bool:
    return path.is_dir() and (path / "model_cfg.yaml").exists() and (path / "model.pt").exists()


def load(path: Path, source_names: list[str] | None = None) -> Crosscoder:
    """Import a crosscode ReLU or JumpReLU crosscoder directory."""
    import yaml

    if not matches(path):
        raise CrosscodersError(
            f"{path}: expected a directory with model_cfg.yaml and model.pt; pass the crosscode "
            "checkpoint directory that holds both"
        )
    try:
        cfg = yaml.safe_load((path / "model_cfg.yaml").read_text()) or {}
    except yaml.YAMLError as err:  # e.g. a python/object tag for the dtype in old versions
        raise CrosscodersError(
            f"{path / 'model_cfg.yaml'} is not plain YAML ({' '.join(str(err).split())}); "
            "remove python/object tags from it (e.g. write the dtype as a string)"
        ) from None
    state = read_tensors(path / "model.pt")
    require(state, ["_W_enc_XiDiL", "_W_dec_LXoDo"], path / "model.pt", "crosscode")
    W_enc = state["_W_enc_XiDiL"].float()
    if W_enc.ndim != 4:
        raise CrosscodersError(
            f"{path}: _W_enc_XiDiL has shape {tuple(W_enc.shape)}; only the model x hookpoint "
            "acausal crosscoder [M, P, D, F] is supported"
        )
    M, P, D, F_ = W_enc.shape
    S = M * P
    activation = cfg.get("activation_fn") or {}
    classname = activation.get("classname", "ReLUActivation")
    act_cfg = activation.get("cfg") or {}
    if classname == "ReLUActivation":
        name, extra = "relu", {}
    elif classname in _JUMPRELU:
        name, extra = "jumprelu", {"jumprelu_bandwidth": float(act_cfg.get("bandwidth", 2.0))}
    else:
        raise CrosscodersError(
            f"{path}: activation {classname} cannot be imported exactly (crosscode's TopK and "
            "BatchTopK rank raw pre-activations without ReLU or decoder-norm weighting, and "
            "its BatchTopK has no inference threshold); supported: ReLUActivation, "
            "AnthropicSTEJumpReLUActivation"
        )
    if source_names is None:
        hookpoints = cfg.get("hookpoints") or [f"hookpoint{p}" for p in range(P)]
        source_names = ([f"model{m}/{h}" for m in range(M) for h in hookpoints] if M > 1
                        else [str(h) for h in hookpoints])
    config = CrosscoderConfig(n_sources=S, d_model=D, dict_size=F_, activation=name,
                              k=min(32, F_), dec_norm="sum", source_names=source_names, **extra)
    b_enc = state.get("b_enc_L", torch.zeros(F_))
    b_dec = state.get("_b_dec_XoDo", torch.zeros(M, P, D))
    model = build(config, W_enc.reshape(S, D, F_), state["_W_dec_LXoDo"].reshape(F_, S, D),
                  b_enc, b_dec.reshape(S, D), {
                      "format": "crosscode", "path": str(path), "activation": classname,
                      "model_cfg": cfg})
    if name == "jumprelu":
        log_threshold = _jumprelu_log_threshold(state, path, F_)
        with torch.no_grad():
            model.activation.log_threshold.copy_(log_threshold)
    if bool(state.get("is_folded", torch.tensor(False))):
        s_in = state["folded_scaling_factors_in_Xi"].float().reshape(S)
        s_out = state["folded_scaling_factors_out_Xo"].float().reshape(S)
        if not torch.allclose(s_in, s_out):
            raise CrosscodersError(
                f"{path}: different input and output scaling factors cannot be folded into one "
                "crosscoder; fold them into the weights with crosscode first"
            )
        with torch.no_grad():  # the weights already work on raw activations: record the scales
            model.folded_scale_S.copy_(s_in)
        model.metadata["imported_from"]["normalisation"] = {"scale": s_in.tolist()}
    return model


def _jumprelu_log_threshold(state: dict, path: Path, n_latents: int) -> torch.Tensor:
    for key in ("_activation_fn.log_threshold_L", "activation_fn.log_threshold_L",
                "_activation_fn.log_threshold_H", "activation_fn.log_threshold_H"):
        if key in state:
            value = state[key].float().reshape(-1)
            if value.numel() != n_latents:
                raise CrosscodersError(f"{path}: {key} has {value.numel()} entries, "
                                       f"expected {n_latents}")
            return value
    raise CrosscodersError(
        f"{path}: JumpReLU checkpoint without a log_threshold parameter; the checkpoint is "
        "incomplete: save it again with crosscode"
    )
