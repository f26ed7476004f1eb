"""Scoring an explanation: which held-out contexts the scorer LLM says the latent fires on.

- detection: the held-out activating contexts and as many non-activating ones, unmarked and
  shuffled; the scorer names those the explanation says the latent fires on.
- fuzzing: the held-out activating contexts, about half with the tokens the latent fires on
  marked and the rest with as many tokens it does not fire on marked; the scorer names
  those whose marks match the explanation. It checks *where* the explanation points, which
  detection alone does not.

Both scores are balanced accuracy, ``(TPR + TNR) / 2``: 0.5 is chance whatever the mix of
the two kinds, 1.0 is perfect.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from crosscoders.interp.contexts import Context
from crosscoders.interp.prompts import marked_text


def confusion(labels: Sequence[bool], predicted: Sequence[bool]) -> tuple[int, int, int, int]:
    """``(tp, fn, tn, fp)`` of boolean predictions against boolean labels."""
    if len(labels) != len(predicted):
        raise ValueError(f"{len(labels)} labels but {len(predicted)} predictions")
    tp = sum(1 for y, p in zip(labels, predicted) if y and p)
    fn = sum(1 for y, p in zip(labels, predicted) if y and not p)
    tn = sum(1 for y, p in zip(labels, predicted) if not y and not p)
    fp = sum(1 for y, p in zip(labels, predicted) if not y and p)
    return tp, fn, tn, fp


def balanced_accuracy(labels: Sequence[bool], predicted: Sequence[bool]) -> float:
    """``(tp / (tp + fn) + tn / (tn + fp)) / 2``; NaN unless both kinds are present."""
    tp, fn, tn, fp = confusion(labels, predicted)
    if tp + fn == 0 or tn + fp == 0:
        return math.nan
    return 0.5 * (tp / (tp + fn) + tn / (tn + fp))


def detection_items(held_out: Sequence[Context], negatives: Sequence[Context],
                    rng: np.random.Generator) -> tuple[list[str], list[bool]]:
    """Shuffled unmarked texts and whether each is an activating one."""
    items = [(marked_text(c.tokens, set()), True) for c in held_out]
    items += [(marked_text(c.tokens, set()), False) for c in negatives]
    order = rng.permutation(len(items))
    return [items[i][0] for i in order], [items[i][1] for i in order]


def fuzzing_items(held_out: Sequence[Context], rng: np.random.Generator,
                  max_marks: int = 3) -> tuple[list[str], list[bool]]:
    """Each held-out context once, marked correctly (its strongest firing tokens, at most
    ``max_marks``) or wrongly (as many tokens where it does not fire); half of each,
    shuffled. A context firing on every token can only be marked correctly."""
    correct = set(rng.permutation(len(held_out))[: (len(held_out) + 1) // 2].tolist())
    items = []
    for k, c in enumerate(held_out):
        firing = [i for i in np.argsort(c.acts)[::-1] if c.acts[i] > 0][:max_marks]
        quiet = [i for i, a in enumerate(c.acts) if a <= 0 and c.tokens[i].strip()]
        if k in correct or len(quiet) < len(firing):
            items.append((marked_text(c.tokens, {int(i) for i in firing}), True))
        else:
            wrong = rng.choice(len(quiet), size=len(firing), replace=False)
            items.append((marked_text(c.tokens, {quiet[int(i)] for i in wrong}), False))
    order = rng.permutation(len(items))
    return [items[i][0] for i in order], [items[i][1] for i in order]
