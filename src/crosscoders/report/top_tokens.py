"""What each latent's decoder vectors promote, read through the models' unembeddings."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch


@torch.no_grad()
def decoder_top_tokens(
    W_dec_FSD: torch.Tensor,
    unembeddings: Mapping[str, tuple[int, torch.Tensor]],
    vocab: Sequence[str],
    k: int = 10,
    latents: Sequence[int] | None = None,
    batch: int = 1024,
) -> dict[int, dict[str, list[tuple[str, float]]]]:
    """Top-``k`` tokens of ``W_dec[i, s] @ W_U`` per latent and model.

    ``unembeddings``: model name -> (source index in ``W_dec_FSD``, ``W_U`` [D, V]), e.g.
    ``{"base": (0, W_U_base), "chat": (1, W_U_chat)}``. ``vocab[v]`` is token v's string.
    Returns ``{latent: {name: [(token, logit), ...]}}``, the input of ``ReportData.top_tokens``
    (save it as ``top_tokens.json`` in the diff directory for ``build_report``).
    """
    idx = torch.arange(W_dec_FSD.shape[0]) if latents is None else torch.as_tensor(latents)
    out: dict[int, dict[str, list[tuple[str, float]]]] = {int(i): {} for i in idx}
    for name, (source, W_U_DV) in unembeddings.items():
        W_U = W_U_DV.float()
        for start in range(0, len(idx), batch):
            rows = idx[start:start + batch]
            logits = W_dec_FSD[rows, source].float().to(W_U.device) @ W_U
            vals, ids = logits.topk(min(k, logits.shape[-1]), dim=-1)
            for i, v_row, id_row in zip(rows.tolist(), vals.tolist(), ids.tolist()):
                out[i][name] = [(vocab[t], v) for t, v in zip(id_row, v_row)]
    return out
