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

:func:`export` is the inverse, for our relu and jumprelu crosscoders: sources named
``model/site`` that form a full grid become M models x P hookpoints (any other naming: M
sources x 1 hookpoint), and a folded normalisation is written the way its trainer saves it
(``is_folded`` with the factors), so the checkpoint works on raw activations there too.
"""

from __future__ import annotations

from pathlib import Path

import torch

from crosscoders.errors import CrosscodersError
from crosscoders.formats.common import build, read_tensors, require
from crosscoders.io import atomic_write, atomic_write_text
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
    saved_names = cfg.get("source_names")  # written by our export
    if source_names is None and isinstance(saved_names, list) and len(saved_names) == S:
        source_names = [str(n) for n in saved_names]
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


# ------------------------------------------------------------------------------- export


def check_export(model: Crosscoder) -> None:
    """Refuse, naming the reason, a crosscoder crosscode cannot reproduce exactly."""
    act = model.config.activation
    if act in ("topk", "batchtopk"):
        fix = ("use --format dictionary_learning, which has BatchTopK" if act == "batchtopk"
               else "keep it in this package's format (push it with `crosscoders push`)")
        raise CrosscodersError(
            f"crosscode's TopK and BatchTopK rank raw pre-activations (no ReLU, no "
            f"decoder-norm weighting) and its BatchTopK has no inference threshold, so this "
            f"{act} crosscoder cannot be exported exactly; {fix}")


def model_grid(names: list[str]) -> tuple[list[str], list[str]]:
    """(models, hookpoints) whose row-major product is ``names`` (``model/site`` names),
    else every source a model with one hookpoint."""
    parts = [name.split("/", 1) for name in names]
    if all(len(p) == 2 for p in parts):
        models = list(dict.fromkeys(p[0] for p in parts))
        sites = list(dict.fromkeys(p[1] for p in parts))
        if [f"{m}/{h}" for m in models for h in sites] == list(names):
            return models, sites
    return list(names), ["activations"]


def export(model: Crosscoder, out: Path) -> None:
    """Write ``model_cfg.yaml`` + ``model.pt`` of a ModelHookpointAcausalCrosscoder."""
    import yaml

    check_export(model)
    c = model.config
    models, hookpoints = model_grid(c.names)
    M, P, D, F_ = len(models), len(hookpoints), c.d_model, c.dict_size
    with torch.no_grad():
        state = {
            "_W_enc_XiDiL": model.W_enc.reshape(M, P, D, F_),
            "_W_dec_LXoDo": model.W_dec.reshape(F_, M, P, D),
            "b_enc_L": model.b_enc,
            "_b_dec_XoDo": model.b_dec.reshape(M, P, D),
            # its trainer saves folded checkpoints with the factors; unfolded ones hold zeros
            "folded_scaling_factors_in_Xi": (model.folded_scale_S.reshape(M, P)
                                             if model.is_folded else torch.zeros(M, P)),
            "folded_scaling_factors_out_Xo": (model.folded_scale_S.reshape(M, P)
                                              if model.is_folded else torch.zeros(M, P)),
            "is_folded": torch.tensor(model.is_folded),
        }
        if c.activation == "jumprelu":
            state["_activation_fn.log_threshold_L"] = model.activation.log_threshold
            activation = {"classname": "AnthropicSTEJumpReLUActivation",
                          "cfg": {"size": F_, "bandwidth": float(c.jumprelu_bandwidth)}}
        else:
            activation = {"classname": "ReLUActivation", "cfg": {}}
        state = {k: v.detach().cpu().clone().contiguous() for k, v in state.items()}
    cfg = {"n_models": M, "n_hookpoints": P, "d_model": D, "n_latents": F_,
           "activation_fn": activation, "use_encoder_bias": True, "use_decoder_bias": True,
           "dtype": "float32",
           # provenance its loader ignores; our importer reads the names back
           "hookpoints": hookpoints, "models": models, "source_names": list(c.names)}
    atomic_write(out / "model.pt", lambda tmp: torch.save(state, tmp))
    atomic_write_text(out / "model_cfg.yaml", yaml.safe_dump(cfg, sort_keys=False))
