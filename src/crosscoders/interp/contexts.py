"""The contexts a latent is explained and scored on, read from a diff directory's
``examples.db`` (written by ``crosscoders diff``).

Per latent, its activating contexts (top and sampled, one per store row) are split into

- ``explain``: what the explainer sees, the top contexts first, then sampled ones;
- ``held_out``: activating contexts kept back for scoring, drawn from the *sampled* firings
  (they span the activation distribution, so a score is not only about the strongest
  cases), topped up from the weakest top contexts when there are too few;
- ``negatives``: as many contexts that are not the latent's: other latents' examples whose
  rows the latent is not known to fire on. Without the crosscoder this is an assumption
  (a latent firing on a fraction p of tokens fires somewhere in a 20-token window with
  probability ~20p); with it (:class:`ActivationCheck`) each one is checked exactly.
"""

from __future__ import annotations

import dataclasses
import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from crosscoders.errors import CrosscodersError, DataError
from crosscoders.io import unreadable

if TYPE_CHECKING:
    from crosscoders.data import ActivationData
    from crosscoders.model import Crosscoder

#: byte-level BPE / SentencePiece markers -> the characters they stand for
_TOKEN_MARKERS = {"\u0120": " ", "\u2581": " ", "\u010a": "\n", "\u0109": "\t"}


@dataclasses.dataclass(frozen=True)
class Context:
    """One window of text: its token ids and strings, and a latent's activation on each
    token (zeros for a negative, whose activations are not those of the latent asked)."""

    ids: tuple[int, ...]
    tokens: tuple[str, ...]
    acts: tuple[float, ...]
    row: int  # store row of the example's centre token
    center: int  # index of that token in ``tokens``
    kind: str  # "top", "sample" or "negative"
    value: float  # the latent's activation at the centre (0 for a negative)

    def firing_rows(self) -> set[int]:
        """Store rows (consecutive within a context) where the activation is positive."""
        first = self.row - self.center
        return {first + i for i, a in enumerate(self.acts) if a > 0}

    def rows(self) -> range:
        first = self.row - self.center
        return range(first, first + len(self.tokens))

    def as_negative(self) -> Context:
        return dataclasses.replace(self, acts=(0.0,) * len(self.acts), kind="negative",
                                   value=0.0)


@dataclasses.dataclass
class LatentContexts:
    """What one latent is explained (``explain``) and scored (``held_out``, ``negatives``) on."""

    latent: int
    explain: list[Context]
    held_out: list[Context]
    negatives: list[Context]
    max_act: float
    negatives_checked: bool = False


def token_text(token: str) -> str:
    """A token string as text: the space/newline markers of BPE vocabularies replaced."""
    for marker, char in _TOKEN_MARKERS.items():
        token = token.replace(marker, char)
    return token


def read_examples(path: str | Path, tokenizer: Any = None) -> dict[int, list[Context]]:
    """Each latent's activating contexts from ``examples.db``: top ones by rank, then the
    sampled ones not already among them, strongest first. ``tokenizer`` decodes the token
    ids (needed when the diff stored ids without text)."""
    from crosscoders.diff.examples import load_examples

    path = Path(path)
    if not path.is_file():
        raise CrosscodersError(
            f"{path.parent} has no examples.db; run `crosscoders diff` with --examples "
            "exclusive (the default) or all, or pass its output directory"
        )
    try:
        records = load_examples(path)
    except sqlite3.DatabaseError as err:
        raise unreadable(path, "an examples database", err,
                         "re-run `crosscoders diff` into a new directory") from None
    out: dict[int, list[Context]] = {}
    seen: dict[int, set[int]] = {}
    for rec in sorted(records, key=lambda r: (r["latent"], r["kind"] != "top",
                                              r["rank"] if r["kind"] == "top" else -r["value"])):
        ctx = _context(rec, tokenizer, path)
        latent = int(rec["latent"])
        if ctx is None or ctx.row in seen.setdefault(latent, set()):
            continue  # no usable window, or a sampled firing that is also a top one
        seen[latent].add(ctx.row)
        out.setdefault(latent, []).append(ctx)
    return out


def _context(rec: dict, tokenizer: Any, path: Path) -> Context | None:
    ids = [int(i) for i in rec.get("tokens") or []]
    acts = rec.get("acts")
    if not ids or acts is None or len(acts) != len(ids):
        return None
    keep = [k for k, i in enumerate(ids) if i >= 0]  # negative ids: no token known
    kept_ids = [ids[k] for k in keep]
    if tokenizer is not None:
        strings = [tokenizer.decode([i]) for i in kept_ids]
    elif rec.get("text") is not None and len(rec["text"]) == len(keep):
        strings = [token_text(str(t)) for t in rec["text"]]
    else:
        raise CrosscodersError(
            f"{path} stores token ids without their text (the diff ran without --models); "
            "pass --tokenizer PATH (the models' tokenizer directory, hub id or GGUF file)"
        )
    center = int(rec.get("center") or 0)
    if center not in keep:
        return None
    return Context(ids=tuple(kept_ids), tokens=tuple(strings),
                   acts=tuple(float(acts[k]) if acts[k] is not None else 0.0 for k in keep),
                   row=int(rec["row"]), center=keep.index(center), kind=str(rec["kind"]),
                   value=float(rec["value"]))


#: ``check(latent, contexts) -> max activation of the latent in each context``
Check = Callable[[int, Sequence[Context]], Sequence[float]]


def split_contexts(
    latent: int,
    contexts: list[Context],
    pool: Sequence[Context],
    n_explain: int,
    n_score: int,
    seed: int,
    check: Check | None = None,
) -> LatentContexts:
    """Split one latent's activating ``contexts`` (from :func:`read_examples`) into what the
    explainer sees and what scores it; negatives come from ``pool`` (other latents'
    contexts). The split depends only on ``seed`` and the latent, not on other latents."""
    rng = np.random.default_rng([seed, latent])
    tops = [c for c in contexts if c.kind == "top"]
    samples = [c for c in contexts if c.kind != "top"]
    n_held = min(n_score, len(contexts) // 2)
    pick = set(rng.choice(len(samples), size=min(n_held, len(samples)), replace=False).tolist())
    held = [c for i, c in enumerate(samples) if i in pick]
    samples = [c for i, c in enumerate(samples) if i not in pick]
    while len(held) < n_held:  # top up from the weakest top contexts
        held.append(tops.pop())
    max_act = max((max(c.acts) for c in contexts), default=0.0)
    negatives = _negatives(latent, contexts, pool, len(held), rng, check)
    return LatentContexts(latent, (tops + samples)[:n_explain], held, negatives,
                          max_act, check is not None)


def _negatives(latent: int, contexts: list[Context], pool: Sequence[Context], n: int,
               rng: np.random.Generator, check: Check | None) -> list[Context]:
    """Up to ``n`` pool contexts sharing no row with the latent's known firings (and, with
    ``check``, where it does not fire at all), drawn at random without repeats."""
    if n == 0 or not pool:
        return []
    firing = set().union(*(c.firing_rows() for c in contexts))
    own = {c.row for c in contexts}
    out: list[Context] = []
    used: set[int] = set()
    order = rng.permutation(len(pool))
    step = max(2 * n, 8)
    for start in range(0, len(order), step):
        batch = [pool[i] for i in order[start:start + step]]
        batch = [c for c in batch if c.row not in own and c.row not in used
                 and firing.isdisjoint(c.rows())]
        if check is not None and batch:
            batch = [c for c, m in zip(batch, check(latent, batch)) if m <= 0]
        for c in batch:
            used.add(c.row)
            out.append(c.as_negative())
            if len(out) == n:
                return out
        if start >= 20 * step:  # a latent firing almost everywhere: give up looking
            break
    return out


def negative_pool(by_latent: dict[int, list[Context]]) -> list[Context]:
    """Every stored context once (by row), in a fixed order."""
    pool: dict[int, Context] = {}
    for latent in sorted(by_latent):
        for c in by_latent[latent]:
            pool.setdefault(c.row, c)
    return [pool[r] for r in sorted(pool)]


class ActivationCheck:
    """Exact activations of a latent on any stored context: the crosscoder encodes the
    rows of the context's window, read from the data the diff ran on."""

    def __init__(self, crosscoder: Crosscoder, data: ActivationData, device: str = "cpu") -> None:
        from crosscoders.data import as_source

        self.model = crosscoder.to(device).eval()
        self.source = as_source(data)
        self.device = device

    def __call__(self, latent: int, contexts: Sequence[Context]) -> list[float]:
        import torch

        windows = []
        for c in contexts:
            ids, rows, _ = self.source.window(c.row, c.center, len(c.tokens) - 1 - c.center)
            ids = [int(i) for i in ids if int(i) >= 0]
            if tuple(ids) != c.ids:
                raise DataError(
                    f"the data's tokens around row {c.row} differ from examples.db; pass "
                    "the --store (and --crosscoder) that `crosscoders diff` ran on"
                )
            windows.append(np.asarray(rows)[np.asarray(rows) >= 0])
        need = np.unique(np.concatenate(windows)) if windows else np.zeros(0, np.int64)
        if need.size == 0:
            return [0.0] * len(contexts)
        with torch.inference_mode():
            x = self.source.gather(need).to(device=self.device, dtype=self.model.W_dec.dtype)
            f_N = self.model.encode(x)[:, latent].double().cpu().numpy()
        where = {int(r): k for k, r in enumerate(need)}
        return [float(max((f_N[where[int(r)]] for r in w), default=0.0)) for w in windows]
