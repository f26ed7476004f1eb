"""Made-up but realistic-looking ReportData, for tests and for previewing the page."""

from __future__ import annotations

import numpy as np

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

_WORDS = (
    "the of and to in is that it for on with as was by at be this from or have an are not "
    "you but his they we her she he which one all their there were can if will would what "
    "about when so up out who them some into time only could new other than then now also "
    "model answer user assistant question please help sure here code data function return "
    "Paris France city river bridge music song light water sun night moon star tree forest "
    "number two three four hundred year day week Monday morning evening ! ? . , ; : ( ) \" '"
).split()
_SPECIAL = ["<start_of_turn>", "<end_of_turn>", "user", "model", "\n", "\n\n"]


def synthetic_report_data(
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
    vocab = np.array([" " + w if w.isalnum() else w for w in _WORDS] + _SPECIAL)
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
                rng.choice(_WORDS, 10, replace=False), np.sort(rng.gamma(2, 1.5, 10))[::-1])]
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
