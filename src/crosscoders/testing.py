"""Small, deterministic stand-ins for tests, benchmarks and report previews (no downloads).

The same arguments give the same output, so tests can assert exact behaviour:

- tiny random-init causal LMs of the supported families (:func:`make_model`), a local
  word-level tokenizer (:func:`make_tokenizer`), and random text and chat corpora over its
  words (:func:`write_text_corpus`, :func:`write_chat_corpus`): what harvesting, diffing
  and the pipeline run on in tests and ``benchmarks/harvest.py``;
- made-up but realistic-looking report data (:func:`fake_report_data`,
  :func:`fake_layers_data`): what the reports' tests render, and pages to look at without
  training anything.

The library itself never imports this module.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from crosscoders.report.data import ReportData
    from crosscoders.report.layers import LayersReportData

# --------------------------------------------------------------------------------------------
# Tiny language models and corpora

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


# --------------------------------------------------------------------------------------------
# Report data

_REPORT_WORDS = (
    "the of and to in is that it for on with as was by at be this from or have an are not "
    "you but his they we her she he which one all their there were can if will would what "
    "about when so up out who them some into time only could new other than then now also "
    "model answer user assistant question please help sure here code data function return "
    "Paris France city river bridge music song light water sun night moon star tree forest "
    "number two three four hundred year day week Monday morning evening ! ? . , ; : ( ) \" '"
).split()
_REPORT_SPECIALS = ["<start_of_turn>", "<end_of_turn>", "user", "model", "\n", "\n\n"]


def fake_report_data(
    n_latents: int = 16384,
    n_with_examples: int = 2000,
    n_examples: int = 20,
    context_len: int = 48,
    n_steps: int = 4000,
    seed: int = 0,
) -> ReportData:
    """A ReportData with ``n_latents`` latents of made-up statistics.

    The first ``n_with_examples`` latents (and every chat-only one) get ``n_examples``
    max-activating examples, decoder top tokens and an activation histogram.
    """
    from crosscoders.diff.categories import PRESETS
    from crosscoders.diff.schema import (
        CATEGORY,
        COS,
        DEC_COS,
        DIFF_SCORE,
        FREQ,
        LATENT,
        MAX_ACT,
        NORM_BASE,
        NORM_CHAT,
        NU_EPS,
        NU_R,
        REL_NORM,
        REL_NORM_Q,
        TRULY_CHAT_ONLY,
        Summary,
    )
    from crosscoders.report.data import Example, ReportData

    rng = np.random.default_rng(seed)
    F = n_latents
    category = rng.choice(["shared", "chat_only", "base_only", "other", "chat_leaning",
                           "base_leaning", "rare", "dead"], size=F,
                          p=[0.74, 0.04, 0.03, 0.05, 0.04, 0.03, 0.03, 0.04])
    r = np.clip(rng.normal(0.5, 0.015, F), 0.46, 0.54)
    r[category == "chat_only"] = rng.uniform(0.91, 1.0, (category == "chat_only").sum())
    r[category == "base_only"] = rng.uniform(0.0, 0.09, (category == "base_only").sum())
    other = category == "other"
    r[other] = np.where(rng.random(other.sum()) < 0.5, rng.uniform(0.12, 0.4, other.sum()),
                        rng.uniform(0.6, 0.88, other.sum()))
    for name, lo, hi in (("chat_leaning", 0.55, 0.75), ("base_leaning", 0.25, 0.45)):
        r[category == name] = rng.uniform(lo, hi, (category == name).sum())
    untrained = np.isin(category, ["rare", "dead"])
    r[untrained] = 0.5 + rng.normal(0, 0.002, untrained.sum())
    total = rng.lognormal(0.0, 0.3, F)
    n_chat, n_base = r * total, (1 - r) * total
    cos = np.where(category == "shared", 1 - rng.beta(1.2, 12, F), rng.uniform(-0.2, 0.9, F))
    freq = 10 ** rng.normal(-3.0, 0.7, F)
    freq[category == "dead"] = 0.0
    freq[category == "rare"] = 1e-7
    # the graded view's score: null SDs from the centre (sd 0.015 in rel_norm here)
    diff_score = np.abs(r - 0.5) / 0.015
    diff_score[untrained] = np.nan
    q = np.clip(2 * np.exp(-(diff_score**2) / 2) * F / 2000, 0, 1)
    max_act = rng.lognormal(1.2, 0.5, F)
    nu_r = np.full(F, np.nan)
    nu_eps = np.full(F, np.nan)
    scaled = (category == "chat_only") | (rng.random(F) < 0.02)
    nu_r[scaled] = np.clip(rng.beta(2, 3, scaled.sum()) * 1.4, 0, None)
    nu_eps[scaled] = np.clip(rng.beta(1.5, 3, scaled.sum()) * 1.2, 0, None)
    truly = (category == "chat_only") & (nu_r < 0.5) & (nu_eps < 0.2)
    latents = {  # a subset of the columns `crosscoders diff` writes, by the same names
        LATENT: np.arange(F), CATEGORY: category, REL_NORM: r, COS: cos, DEC_COS: cos,
        NORM_BASE: n_base, NORM_CHAT: n_chat, FREQ: freq, MAX_ACT: max_act,
        NU_R: nu_r, NU_EPS: nu_eps, TRULY_CHAT_ONLY: truly,
        DIFF_SCORE: diff_score, REL_NORM_Q: q,
    }

    with_examples = set(range(min(n_with_examples, F))) | set(np.flatnonzero(category ==
                                                                             "chat_only"))
    examples, top_tokens, hists = {}, {}, {}
    vocab = np.array([" " + w if w.isalnum() else w for w in _REPORT_WORDS] + _REPORT_SPECIALS)
    for i in sorted(int(x) for x in with_examples):
        favourite = rng.integers(0, len(vocab), 3)
        tok_EC = rng.integers(0, len(vocab), (n_examples, context_len))
        acts_EC = np.zeros((n_examples, context_len))
        peak_E = rng.integers(context_len // 2, context_len, n_examples)
        rows = np.arange(n_examples)
        tok_EC[rows, peak_E] = favourite[rows % 3]
        near = rng.integers(0, context_len, (n_examples, 4))
        acts_EC[rows[:, None], near] = rng.uniform(0, 0.6, (n_examples, 4)) * max_act[i]
        acts_EC[rows, peak_E] = max_act[i] * (1 - 0.03 * rows)
        exs = [Example(vocab[tok_EC[j]].tolist(), acts_EC[j].tolist(),
                       label="chat" if j % 2 else "base") for j in range(n_examples)]
        examples[i] = exs
        top_tokens[i] = {
            name: [(" " + str(t), float(v)) for t, v in zip(
                rng.choice(_REPORT_WORDS, 10, replace=False), np.sort(rng.gamma(2, 1.5, 10))[::-1])]
            for name in ("chat", "base")
        }
        samples = rng.gamma(2.0, max_act[i] / 6, 2000)
        counts, edges = np.histogram(samples[samples < max_act[i]], bins=30)
        hists[i] = (edges.tolist(), counts.tolist())

    steps = np.arange(50, n_steps + 1, 50)
    t = steps / n_steps
    metrics = []
    for s, x in zip(steps, t):
        noise = 1 + 0.04 * rng.standard_normal()
        metrics.append({
            "step": int(s), "split": "train", "loss": float((0.9 * np.exp(-5 * x) + 0.18) * noise),
            "recon": float((0.8 * np.exp(-5 * x) + 0.15) * noise),
            "l0": float(32 + 200 * np.exp(-20 * x)), "dead_frac": float(0.3 * np.exp(-8 * x)),
            "fvu/base": float((0.6 * np.exp(-5 * x) + 0.09) * noise),
            "fvu/chat": float((0.6 * np.exp(-5 * x) + 0.1) * noise), "lr": 2e-4,
        })
        if s % 500 == 0:
            metrics.append({"step": int(s), "split": "eval", "l0": 32.0,
                            "fvu/base": float(0.6 * np.exp(-5 * x) + 0.095),
                            "fvu/chat": float(0.6 * np.exp(-5 * x) + 0.105),
                            "dead_frac": float(0.3 * np.exp(-8 * x))})
    config = {
        "crosscoder": {"n_sources": 2, "d_model": 2304, "dict_size": F, "activation": "batchtopk",
                       "k": 32, "source_names": ["base", "chat"]},
        "train": {"steps": n_steps, "batch_size": 2048, "lr": 2e-4, "seed": seed},
        "data": {"kind": "store", "n_tokens": 50_000_000, "models": ["gemma-2-2b",
                                                                     "gemma-2-2b-it"],
                 "site": "resid_out:13"},
    }
    counts = {c: int((category == c).sum()) for c in np.unique(category)}
    summary = {Summary.PRESET: "anthropic", Summary.N_LATENTS: F,
               Summary.THRESHOLDS: PRESETS["anthropic"].to_dict(),
               Summary.COUNTS: counts, "n_truly_chat_only": int(truly.sum()),
               Summary.GRADED: {"fdr": 0.05, "min_fires": 10, "band": [0.455, 0.545],
                                "z_threshold": 3.0, "n_tested": int((~untrained).sum()),
                                "n_chat_leaning": counts.get("chat_leaning", 0),
                                "n_base_leaning": counts.get("base_leaning", 0)}}
    similarity = {"cka": {"resid_out:13": 0.962}, "svcca": {"resid_out:13": 0.911}}
    lens = [
        {"position": p, "norm": float(3.0 / (p + 1)),
         "promoted": [(" " + w, float(v)) for w, v in zip(("Sure", "help", "assistant", "I",
                                                           "happy", "answer"),
                                                          np.linspace(5, 2, 6))],
         "suppressed": [(" " + w, float(-v)) for w, v in zip(("the", "of", "Chapter", "def",
                                                              "http", "Copyright"),
                                                             np.linspace(4, 1.5, 6))]}
        for p in range(3)
    ]
    return ReportData(
        latents=latents, title="Synthetic crosscoder report", summary=summary, config=config,
        metrics=metrics, examples=examples, similarity=similarity, lens=lens,
        top_tokens=top_tokens, act_hists=hists,
    )


def fake_layers_data(
    n_latents: int = 4096,
    n_layers: int = 6,
    n_with_examples: int = 200,
    n_examples: int = 10,
    threshold: float = 0.5,
    seed: int = 0,
) -> LayersReportData:
    """A LayersReportData of a made-up cross-layer crosscoder: each firing latent writes a
    run of consecutive layers around its peak (norm >= 0.55 x peak there, <= 0.3 x peak
    elsewhere); 5% never fire. The columns follow ``layers.layer_profile``'s definitions.
    The first ``n_with_examples`` firing latents get contexts, overall and per layer."""
    from crosscoders.report.data import Example
    from crosscoders.report.layers import LayersReportData

    rng = np.random.default_rng(seed)
    F, S = n_latents, n_layers
    names = [f"resid_out:{4 * (s + 1)}" for s in range(S)]
    peak = rng.integers(0, S, F)
    width = np.minimum(rng.geometric(0.45, F), S)
    start = np.clip(peak - rng.integers(0, width), 0, S - width)
    layer_S = np.arange(S)
    inside = (layer_S >= start[:, None]) & (layer_S < (start + width)[:, None])
    rel = np.where(inside, rng.uniform(0.55, 0.95, (F, S)), rng.uniform(0.0, 0.3, (F, S)))
    rel[np.arange(F), peak] = 1.0
    fires = rng.random(F) > 0.05
    freq = np.where(fires, 10 ** rng.normal(-2.5, 0.6, F), 0.0)
    norms = rel * rng.lognormal(0.0, 0.2, F)[:, None]
    norms[~fires] = rng.uniform(0.9, 1.1, ((~fires).sum(), S))  # untrained: even over layers
    peak = norms.argmax(1)
    above = (norms / norms.max(1, keepdims=True) >= threshold) & fires[:, None]
    span = above.sum(1)
    first = np.where(fires, np.where(above, layer_S, S).min(1), -1)
    last = np.where(above, layer_S, -1).max(1)
    sq = norms**2
    table = {"latent": np.arange(F), "peak": peak,
             "peak_name": np.array(names, dtype=object)[peak], "span": span, "first": first,
             "last": last, "contiguous": (last - first + 1 == span) & fires,
             "effective_layers": np.where(fires, sq.sum(1) ** 2 / (sq**2).sum(1), 0.0),
             "freq": freq}
    table.update({f"norm/{n}": norms[:, s] for s, n in enumerate(names)})
    summary = {
        "n_latents": F, "n_counted": int(fires.sum()), "counted":
        "latents firing on more than 0 of the tokens", "n_sources": S, "sources": names,
        "threshold": threshold,
        "span_counts": {str(n): int((span[fires] == n).sum()) for n in range(1, S + 1)},
        "multi_layer_fraction": float((span[fires] >= 2).mean()),
        "contiguous_fraction_of_multi_layer": float(table["contiguous"][fires & (span >= 2)]
                                                    .mean()),
        "mean_effective_layers": float(table["effective_layers"][fires].mean()),
        "fvu": {n: float(0.05 + 0.03 * s + rng.uniform(0, 0.01)) for s, n in enumerate(names)},
        "evaluated": {"split": "held-out", "n_tokens": 100_000}, "l0": 48.0,
    }
    vocab = [" " + w if w.isalnum() else w for w in _REPORT_WORDS]
    examples, by_layer = {}, {}
    for i in np.flatnonzero(fires)[:n_with_examples].tolist():
        def contexts(n: int, favourite: int) -> list[Example]:
            out = []
            for j in range(n):
                toks = rng.integers(0, len(vocab), 24)
                acts = np.zeros(24)
                at = int(rng.integers(8, 24))
                toks[at] = favourite
                acts[at] = 3.0 * (1 - 0.05 * j)
                acts[at - 1] = 0.8
                out.append(Example([vocab[t] for t in toks], acts.tolist()))
            return out

        examples[i] = contexts(n_examples, int(rng.integers(0, len(vocab))))
        by_layer[i] = {names[s]: contexts(n_examples // 2, int(rng.integers(0, len(vocab))))
                       for s in np.flatnonzero(above[i]).tolist()}
    comparison = {
        "n_layers": S, "d_model": 32, "dict_size": 128, "steps": 1000,
        "crosscoder": [{"k": k, "l0": 0.9 * k, "fvu": 0.4 / k**1.5} for k in (2, 4, 8, 16)],
        "per_layer_saes": [{"k": k, "l0": 2.5 * S * k / 4, "fvu": 0.45 / k**1.4}
                           for k in (1, 2, 4, 6)],
        "matched": [{"fvu": f, "crosscoder_l0": 2.0 / f**0.3, "per_layer_l0": 5.2 / f**0.3,
                     "ratio": 2.6} for f in (0.1, 0.03, 0.01)],
    }
    return LayersReportData(table, summary, examples=examples, layer_examples=by_layer,
                            comparison=comparison, title="Synthetic layer study")
