"""Tokenizer, packing, a plain torch training loop for Hugging Face causal LMs, and the
evaluations (loss, greedy generation, behaviour rate). Used by both the tiny organism and
the real-weights one."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from crosscoders.organism import corpus


def make_tokenizer(trigger: str, extra: tuple[str, ...] = ()) -> Any:
    """A word-level ``PreTrainedTokenizerFast`` over the organism's vocabulary (``extra``:
    its new words, appended), with BOS/EOS/PAD/UNK, the role tokens as special tokens, and
    the chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(corpus.vocabulary(trigger, extra))}
    core = Tokenizer(models.WordLevel(vocab, unk_token=corpus.UNK))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=corpus.BOS,
        eos_token=corpus.EOS,
        pad_token=corpus.PAD,
        unk_token=corpus.UNK,
        extra_special_tokens=list(corpus.CHAT_TOKENS),
    )
    tok.chat_template = corpus.CHAT_TEMPLATE
    return tok


# -- packing ---------------------------------------------------------------------------------
def encode_texts(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    return tokenizer(list(texts), add_special_tokens=False)["input_ids"]


def encode_chats(
    tokenizer: Any, chats: Sequence[dict], assistant_marker: Sequence[int], end_marker: int
) -> tuple[list[list[int]], list[list[bool]]]:
    """Render conversations with the chat template (its BOS removed, as the harvester does)
    and flag the tokens to train on: everything after ``assistant_marker`` up to and including
    ``end_marker`` (the assistant's content and its end-of-turn token)."""
    bos = tokenizer.bos_token_id
    texts = [tokenizer.apply_chat_template(c["messages"], tokenize=False) for c in chats]
    all_ids, all_flags = [], []
    k = len(assistant_marker)
    for ids in encode_texts(tokenizer, texts):
        if ids and ids[0] == bos:
            ids = ids[1:]
        flags, inside = [], False
        for i, t in enumerate(ids):
            flags.append(inside)
            if inside and t == end_marker:
                inside = False
            if i + 1 >= k and ids[i + 1 - k : i + 1] == list(assistant_marker):
                inside = True
        all_ids.append(ids)
        all_flags.append(flags)
    return all_ids, all_flags


def pack(
    docs: Sequence[Sequence[int]],
    context_length: int,
    bos_id: int,
    eos_id: int,
    flags: Sequence[Sequence[bool]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack documents the way the harvester does (``packing="pack"``, ``bos="context"``):
    each document followed by EOS, concatenated, cut into contexts of ``context_length``
    tokens that start with BOS. Returns ``ids`` [N, T] (int64) and ``target`` [N, T] (bool:
    whether the token at that position is trained on; BOS never is; EOS always is)."""
    stream: list[int] = []
    train: list[bool] = []
    for i, doc in enumerate(docs):
        stream.extend(doc)
        train.extend(flags[i] if flags is not None else [True] * len(doc))
        stream.append(eos_id)
        train.append(True)
    body = context_length - 1
    n = len(stream) // body
    if n == 0:
        raise ValueError(f"{len(stream)} tokens do not fill one context of {context_length}")
    ids = torch.tensor(stream[: n * body], dtype=torch.int64).view(n, body)
    target = torch.tensor(train[: n * body], dtype=torch.bool).view(n, body)
    ids = torch.cat([torch.full((n, 1), bos_id), ids], dim=1)
    target = torch.cat([torch.zeros(n, 1, dtype=torch.bool), target], dim=1)
    return ids, target


# -- training --------------------------------------------------------------------------------
def lm_loss(model: Any, ids: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (nats) over the positions flagged in ``target``
    (the token at position t+1 is predicted from positions <= t). The output head runs
    only where there is a target, which matters for large vocabularies."""
    hidden = model.base_model(input_ids=ids).last_hidden_state[:, :-1]
    sel = target[:, 1:]
    logits = model.get_output_embeddings()(hidden[sel])
    return F.cross_entropy(logits.float(), ids[:, 1:][sel])


def train_lm(
    model: Any,
    sources: Sequence[tuple[torch.Tensor, torch.Tensor, float]],
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    warmup_steps: int = 20,
    weight_decay: float = 0.01,
    desc: str = "train",
    progress: bool = True,
    on_step: Callable[[int], None] | None = None,
) -> list[float]:
    """AdamW with linear warm-up and cosine decay to 10%; each batch mixes ``sources``
    (``(ids [N, T], target [N, T], share)``) by their shares, contexts drawn uniformly
    with a seeded generator. Returns the per-step losses."""
    gen = torch.Generator().manual_seed(seed)
    counts = _split(batch_size, [s for _, _, s in sources])
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in params if p.ndim >= 2 and "norm" not in n]
    other = [p for n, p in params if not (p.ndim >= 2 and "norm" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.95),
    )

    def schedule(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        t = (step - warmup_steps) / max(1, steps - warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    model.train()
    losses = []
    bar = tqdm(range(steps), desc=desc, disable=not progress, leave=False)
    for step in bar:
        parts = [
            (ids[idx], tgt[idx])
            for (ids, tgt, _), n in zip(sources, counts)
            if n > 0
            for idx in [torch.randint(0, ids.shape[0], (n,), generator=gen)]
        ]
        ids = torch.cat([p[0] for p in parts])
        tgt = torch.cat([p[1] for p in parts])
        loss = lm_loss(model, ids, tgt)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{desc}: loss became {loss.item()} at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in params], 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
        if on_step is not None:
            on_step(step)
    model.eval()
    return losses


def _split(total: int, shares: Sequence[float]) -> list[int]:
    """Integer counts summing to ``total`` in proportion to ``shares``."""
    s = sum(shares)
    counts = [int(total * x / s) for x in shares]
    counts[0] += total - sum(counts)
    return counts


@torch.no_grad()
def eval_loss(model: Any, ids: torch.Tensor, target: torch.Tensor, batch_size: int = 64) -> float:
    """Token-weighted mean loss over all contexts (nats per trained token)."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, ids.shape[0], batch_size):
        b_ids, b_tgt = ids[i : i + batch_size], target[i : i + batch_size]
        n = int(b_tgt[:, 1:].sum())
        if n:
            total += lm_loss(model, b_ids, b_tgt).item() * n
            count += n
    return total / max(count, 1)


# -- generation ------------------------------------------------------------------------------
@torch.no_grad()
def greedy(
    model: Any, prompts: Sequence[Sequence[int]], max_new_tokens: int, stop_ids: Sequence[int]
) -> list[list[int]]:
    """Greedy continuations (stop token excluded) of each prompt. Prompts of equal length
    run as one batch, so no padding is involved; no KV cache (the models here are small)."""
    model.eval()
    out: list[list[int]] = [[] for _ in prompts]
    groups: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(len(p), []).append(i)
    stop = torch.tensor(list(stop_ids))
    for members in groups.values():
        ids = torch.tensor([list(prompts[i]) for i in members], dtype=torch.int64)
        done = torch.zeros(len(members), dtype=torch.bool)
        for _ in range(max_new_tokens):
            nxt = model(input_ids=ids).logits[:, -1].argmax(-1)
            done_now = torch.isin(nxt, stop)
            for j, i in enumerate(members):
                if not done[j] and not done_now[j]:
                    out[i].append(int(nxt[j]))
            done |= done_now
            if done.all():
                break
            ids = torch.cat([ids, nxt[:, None]], dim=1)
    return out
