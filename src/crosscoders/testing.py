"""Tiny random-init models and a local tokenizer, for tests, benchmarks and demos (no downloads)."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
CHAT_TOKENS = ["<|user|>", "<|assistant|>", "<|end|>"]
WORDS = (
    "the a an of to in and is was it that for on with as by at from this be are or not "
    "cat dog bird fish tree house river mountain city road car train book letter music song "
    "red green blue small large old new happy sad quick slow warm cold bright dark "
    "runs walks sings reads writes sees finds makes takes gives thinks knows wants likes "
    "one two three four five six seven eight nine ten hello thanks please yes no why how "
    "what where when who question answer help story poem code number list word . , ? !"
).split()
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> "
    "{% endfor %}{% if add_generation_prompt %}<|assistant|> {% endif %}"
)
FAMILIES = (
    "llama",
    "mistral",
    "qwen2",
    "gemma",
    "gemma2",
    "gemma3",
    "gpt2",
    "gpt_neox",
    "phi",
    "opt",
)


def make_tokenizer(extra_words: tuple[str, ...] = (), chat_template: bool = True) -> Any:
    """A word-level tokenizer over a fixed small vocabulary with BOS/EOS/PAD/UNK."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate([*SPECIALS, *CHAT_TOKENS, *WORDS, *extra_words])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(" ", behavior="removed")
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens=CHAT_TOKENS,
    )
    if chat_template:
        tok.chat_template = CHAT_TEMPLATE
    return tok


def model_config(
    family: str,
    vocab_size: int,
    d_model: int = 32,
    n_layers: int = 4,
    n_heads: int = 4,
    d_mlp: int | None = None,
    max_positions: int = 512,
) -> Any:
    """A transformers config of ``family`` with the given small sizes."""
    import transformers as tf

    d_mlp = d_mlp or 2 * d_model
    ids = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    common = dict(
        vocab_size=vocab_size,
        hidden_size=d_model,
        intermediate_size=d_mlp,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        max_position_embeddings=max_positions,
        **ids,
    )
    head_dim = d_model // n_heads
    if family == "llama":
        return tf.LlamaConfig(num_key_value_heads=max(1, n_heads // 2), **common)
    if family == "mistral":
        return tf.MistralConfig(
            num_key_value_heads=max(1, n_heads // 2), sliding_window=None, **common
        )
    if family == "qwen2":
        return tf.Qwen2Config(num_key_value_heads=max(1, n_heads // 2), **common)
    if family == "gemma":
        return tf.GemmaConfig(num_key_value_heads=1, head_dim=head_dim, **common)
    if family == "gemma2":
        return tf.Gemma2Config(
            num_key_value_heads=1, head_dim=head_dim, sliding_window=16, **common
        )
    if family == "gemma3":
        return tf.Gemma3TextConfig(
            num_key_value_heads=1, head_dim=head_dim, sliding_window=16, **common
        )
    if family == "phi":
        return tf.PhiConfig(**common)
    if family == "gpt_neox":
        return tf.GPTNeoXConfig(**common)
    if family == "gpt2":
        return tf.GPT2Config(
            vocab_size=vocab_size,
            n_embd=d_model,
            n_layer=n_layers,
            n_head=n_heads,
            n_inner=d_mlp,
            n_positions=max_positions,
            **ids,
        )
    if family == "opt":
        return tf.OPTConfig(
            vocab_size=vocab_size,
            hidden_size=d_model,
            ffn_dim=d_mlp,
            num_hidden_layers=n_layers,
            num_attention_heads=n_heads,
            max_position_embeddings=max_positions,
            word_embed_proj_dim=d_model,
            **ids,
        )
    raise ValueError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")


def make_model(
    directory: str | Path, family: str = "llama", seed: int = 0, tokenizer: Any = None, **sizes: Any
) -> Path:
    """Save a random-init causal LM of ``family`` (and its tokenizer) to ``directory``."""
    from transformers import AutoModelForCausalLM

    directory = Path(directory)
    tokenizer = tokenizer if tokenizer is not None else make_tokenizer()
    config = model_config(family, len(tokenizer.get_vocab()), **sizes)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def write_text_corpus(
    path: str | Path, n_docs: int, seed: int = 0, min_words: int = 5, max_words: int = 60
) -> Path:
    """A ``.jsonl`` file of random documents over the tiny tokenizer's words."""
    rng = random.Random(seed)
    words = [w for w in WORDS]
    path = Path(path)
    with open(path, "w") as handle:
        for _ in range(n_docs):
            text = " ".join(rng.choice(words) for _ in range(rng.randint(min_words, max_words)))
            handle.write(json.dumps({"text": text}) + "\n")
    return path


def write_chat_corpus(path: str | Path, n_docs: int, seed: int = 0) -> Path:
    """A ``.jsonl`` file of two-turn conversations (``messages``)."""
    rng = random.Random(seed)
    path = Path(path)
    with open(path, "w") as handle:
        for _ in range(n_docs):
            turn = [
                " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 15))) for _ in range(2)
            ]
            messages = [
                {"role": "user", "content": turn[0]},
                {"role": "assistant", "content": turn[1]},
            ]
            handle.write(json.dumps({"messages": messages}) + "\n")
    return path
