"""Where an organism's behaviour is, in token ids, and how far apart the base and chat
models are there: the behaviour's KL gap, for scoring a diff method causally (patch what
it found into the base, measure the gap again, see docs/organisms.md).

The gap is teacher-forced: each trigger prompt is followed by its reference answer (the
recipe's own, from the held-out conversations), and at every position that predicts a
behaviour token of that answer the KL divergence KL(chat || model) of the next-token
distributions is taken; ``model`` is the base, or the base with something patched in.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from crosscoders.organism.build import Organism


def behaviour_mask(
    ids_BT: torch.Tensor,
    token_ids: Sequence[int],
    context_ids: Sequence[int] = (),
    boundary_ids: Sequence[int] = (),
) -> torch.Tensor:
    """Bool ``[B, T]``: the positions whose token is one of ``token_ids`` and, when
    ``context_ids`` is not empty, where one of those occurred earlier in the same sentence
    (a sentence ends at any of ``boundary_ids``). The second rule is for behaviours whose
    tokens are ordinary words elsewhere (the fact organism's new home is the behaviour only
    in a sentence about its noun)."""
    is_token = torch.isin(ids_BT, torch.as_tensor(list(token_ids), dtype=ids_BT.dtype))
    if not len(context_ids):
        return is_token
    boundary = torch.isin(ids_BT, torch.as_tensor(list(boundary_ids), dtype=ids_BT.dtype))
    sentence_BT = boundary.long().cumsum(dim=1)  # a sentence's number, counting boundaries
    is_context = torch.isin(ids_BT, torch.as_tensor(list(context_ids), dtype=ids_BT.dtype))
    # the sentence number of the last context token so far; -1 before the first one
    last_context_BT = torch.where(is_context, sentence_BT, -1).cummax(dim=1).values
    return is_token & (last_context_BT == sentence_BT)


def kl_inputs(organism: Organism, which: str = "trigger") -> dict[str, torch.Tensor]:
    """Teacher-forcing inputs for the ``which`` prompts (``"trigger"`` or ``"control"``):
    ``ids`` ``[N, T]`` (prompt + reference answer, right-padded with the pad id, which a
    causal model never looks back at), ``answer`` ``[N, T]`` (positions that predict a
    token of the reference) and ``behaviour`` ``[N, T]`` (positions that predict one of
    its behaviour tokens, per :meth:`Organism.behaviour_mask`)."""
    if which not in ("trigger", "control"):
        raise ValueError(f"which: 'trigger' or 'control', got {which!r}")
    records = organism.metadata["prompts"][which]
    seqs = [list(r["ids"]) + list(r["reference_ids"]) for r in records]
    T = max(len(s) for s in seqs)
    pad = organism.metadata["special_token_ids"]["<pad>"]
    ids = torch.full((len(seqs), T), pad, dtype=torch.int64)
    target = torch.zeros(len(seqs), T, dtype=torch.bool)  # the token is a reference token
    for i, (r, s) in enumerate(zip(records, seqs)):
        ids[i, : len(s)] = torch.tensor(s)
        target[i, len(r["ids"]) : len(s)] = True
    behaviour = organism.behaviour_mask(ids) & target
    # position t predicts token t + 1
    shift = torch.zeros_like(target)
    return {
        "ids": ids,
        "answer": torch.cat([target[:, 1:], shift[:, :1]], dim=1),
        "behaviour": torch.cat([behaviour[:, 1:], shift[:, :1]], dim=1),
    }


def kl_per_position(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(p || q) in nats at every position, from logits ``[..., V]``."""
    log_p = F.log_softmax(p_logits.double(), dim=-1)
    log_q = F.log_softmax(q_logits.double(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


@torch.no_grad()
def behaviour_kl(
    organism: Organism,
    model: Any = None,
    chat: Any = None,
    which: str = "trigger",
    batch_size: int = 32,
) -> dict[str, Any]:
    """KL(chat || ``model``) on the ``which`` prompts, teacher-forced on their reference
    answers: mean over the positions that predict a behaviour token (``behaviour``) and
    over all answer positions (``answer``), in nats. ``model`` defaults to the organism's
    base (then ``behaviour`` is the behaviour's KL gap); pass the base with latents
    patched in to measure what is left, e.g. ``1 - patched / gap`` is the share of the gap
    that the patch closes. Models are anything whose ``(input_ids=...)`` call returns an
    object with ``.logits`` (Hugging Face causal LMs and hooked wrappers of them)."""
    from transformers import AutoModelForCausalLM

    model = model if model is not None else AutoModelForCausalLM.from_pretrained(organism.base_dir)
    chat = chat if chat is not None else AutoModelForCausalLM.from_pretrained(organism.chat_dir)
    inputs = kl_inputs(organism, which)
    kl_NT = torch.zeros(inputs["ids"].shape, dtype=torch.float64)
    for i in range(0, kl_NT.shape[0], batch_size):
        ids = inputs["ids"][i : i + batch_size]
        kl_NT[i : i + batch_size] = kl_per_position(
            chat(input_ids=ids).logits, model(input_ids=ids).logits
        )
    out: dict[str, Any] = {"which": which, "n_prompts": int(kl_NT.shape[0])}
    for name in ("behaviour", "answer"):
        mask = inputs[name]
        out[name] = float(kl_NT[mask].mean()) if mask.any() else float("nan")
        out[f"n_{name}_positions"] = int(mask.sum())
    return out
