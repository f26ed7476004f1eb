"""The activation-difference lens: what does fine-tuning add to the first tokens?

Mean ``chat - base`` activation at one site over the first positions of each context
(where chat and base differ most, Minder et al.'s ADL baseline), read through the chat
model's unembedding as a logit lens: ``logits = W_U final_norm(delta)``. The top tokens
are what the difference promotes; the bottom ones what it suppresses.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from crosscoders.data import RANDOM_ACCESS_FIX, ActivationData, as_source
from crosscoders.diff.stats import progress_bar
from crosscoders.errors import CrosscodersError, DataError

# Final norms of common architectures.
FINAL_NORM_PATHS = ("model.norm", "model.language_model.norm", "model.final_layernorm",
                    "model.decoder.final_layer_norm", "transformer.ln_f",
                    "gpt_neox.final_layer_norm", "transformer.norm_f")


def final_norm(model: nn.Module) -> nn.Module:
    """The norm applied before the unembedding (raises if it cannot be found)."""
    from crosscoders.harvest.models import attribute_path

    for path in FINAL_NORM_PATHS:
        module = attribute_path(model, path)
        if isinstance(module, nn.Module):
            return module
    raise CrosscodersError(
        f"cannot find the final norm of {type(model).__name__}; pass apply_norm=False to read "
        "the raw difference through the unembedding"
    )


@torch.inference_mode()
def activation_difference(
    data: ActivationData,
    base: int = 0,
    chat: int = 1,
    n_positions: int = 5,
    positions: Any = None,
    batch_size: int = 65536,
    progress: bool = True,
) -> dict[str, Any]:
    """Mean ``x_chat - x_base`` over rows at context positions ``< n_positions``.

    ``data``: a store (positions read from it) or a tensor [N, S, D] with ``positions`` [N]
    (None: every row counts as position 0). Returns ``delta_D`` (pooled), ``delta_PD`` (per
    position; NaN where a position has no rows) and ``count_P``.
    """
    source = as_source(data)
    P, D = n_positions, source.d_model
    sum_PD = torch.zeros(P, D, dtype=torch.float64)
    count_P = torch.zeros(P, dtype=torch.int64)
    n = source.n_tokens
    if n is None:
        raise DataError(f"the activation difference reads rows by position; {RANDOM_ACCESS_FIX}")
    given = None if positions is None else np.asarray(positions, dtype=np.int64)
    with progress_bar(n, "activation difference", progress) as bar:
        for s in range(0, n, batch_size):
            e = min(n, s + batch_size)
            pos = source.positions(s, e)  # a store knows them; a tensor takes ``positions``
            if pos is None:
                if given is not None and given.shape != (n,):
                    raise DataError(f"positions must have one entry per row ({n})")
                pos = np.zeros(e - s, dtype=np.int64) if given is None else given[s:e]
            idx = np.flatnonzero(pos < P)
            if idx.size:
                x = source.gather(idx + s).double()
                diff = x[:, chat] - x[:, base]
                p = torch.from_numpy(pos[idx])
                sum_PD.index_add_(0, p, diff)
                count_P += torch.bincount(p, minlength=P)
            bar.update(e - s)
    if int(count_P.sum()) == 0:
        raise DataError(f"no rows at positions < {n_positions}; raise n_positions")
    delta_PD = sum_PD / count_P[:, None].clamp_min(1)
    delta_PD[count_P == 0] = torch.nan
    return {"delta_D": (sum_PD.sum(0) / count_P.sum()).float(), "delta_PD": delta_PD.float(),
            "count_P": count_P}


@torch.inference_mode()
def lens_tokens(delta_D: Tensor, model: nn.Module, tokenizer: Any = None, top: int = 20,
                apply_norm: bool = True) -> dict[str, list]:
    """Top promoted / suppressed tokens of ``delta_D`` through ``model``'s unembedding."""
    unembed = model.get_output_embeddings()
    if unembed is None:
        raise CrosscodersError(
            f"{type(model).__name__} has no output embeddings to read through; the lens needs "
            "a causal language model (AutoModelForCausalLM)"
        )
    p = next(model.parameters())
    h = delta_D.to(p.device, p.dtype)[None, None, :]
    if apply_norm:
        h = final_norm(model)(h)
    logits = unembed(h)[0, 0].float().cpu()
    k = min(top, logits.numel())
    out: dict[str, list] = {}
    for name, (vals, ids) in (("promoted", logits.topk(k)), ("suppressed", (-logits).topk(k))):
        ids_l = ids.tolist()
        vals_l = vals.tolist() if name == "promoted" else (-vals).tolist()
        toks = tokenizer.convert_ids_to_tokens(ids_l) if tokenizer is not None else ids_l
        out[name] = [{"token_id": i, "token": t, "logit": v}
                     for i, t, v in zip(ids_l, toks, vals_l)]
    return out
