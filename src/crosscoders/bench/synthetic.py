"""Planted-feature benchmark for model diffing: recovery and label scores.

A crosscoder trained on planted activations (``crosscoders.bench.planted``) is scored by
matching its latents to the planted features by decoder cosine (:func:`match_latents`),
then comparing each latent's category label with the truth (:func:`confusion_matrix`,
:func:`precision_recall`). :func:`run_planted_benchmark` trains one crosscoder per
activation and does all of this; :func:`format_benchmark_table` prints it. Definitions are
in ``docs/synthetic.md``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from crosscoders.bench.planted import (
    KINDS,
    PLANTED_CATEGORIES,
    PlantedConfig,
    PlantedData,
    make_planted_data,
)
from crosscoders.diff.categories import (
    CATEGORIES,
    CategoryThresholds,
    classify_latents,
    get_thresholds,
)
from crosscoders.errors import ConfigError, DataError

if TYPE_CHECKING:
    from crosscoders.model import Crosscoder

MISSED = "missed"


# --------------------------------------------------------------------------------------------
# Matching and scoring


@dataclasses.dataclass
class MatchResult:
    """Learned latents matched to planted features by cosine of concatenated decoders.

    Per planted feature p: ``latent_P[p]`` (-1 if unmatched) and ``cosine_P[p]`` (0 if
    unmatched). Per latent i: its most similar planted feature ``nearest_F[i]`` and that
    cosine ``nearest_cos_F[i]``. ``recovery`` is the mean of ``cosine_P`` (with
    ``method="max"`` the mean max cosine); ``frac_recovered`` the fraction above ``threshold``.
    """

    method: str
    threshold: float
    latent_P: np.ndarray
    cosine_P: np.ndarray
    nearest_F: np.ndarray
    nearest_cos_F: np.ndarray

    @property
    def recovered_P(self) -> np.ndarray:
        return self.cosine_P > self.threshold

    @property
    def recovery(self) -> float:
        return float(self.cosine_P.mean())

    @property
    def frac_recovered(self) -> float:
        return float(self.recovered_P.mean())


def concat_cosine(
    W_dec_FSD: torch.Tensor | np.ndarray, directions_PSD: torch.Tensor | np.ndarray
) -> torch.Tensor:
    """[F, P] cosine between flattened [S*D] decoder and planted vectors; 0 for zero vectors.

    Flattening keeps the per-source norm ratio: a chat-only latent (base decoder ~0) matches
    a chat-only feature (zero base direction), and a latent whose weak-side decoder shrank to
    zero still matches a 0.3x-weaker feature at cos ~0.96, so it is found and then judged by
    its label.
    """
    W = torch.as_tensor(W_dec_FSD).detach().to(torch.float64)
    V = torch.as_tensor(directions_PSD).detach().to(torch.float64)
    if W.ndim != 3 or V.ndim != 3 or W.shape[1:] != V.shape[1:]:
        raise DataError(
            f"decoder [F, S, D] and directions [P, S, D] must agree on S and D; got "
            f"{tuple(W.shape)} and {tuple(V.shape)}"
        )
    W = W.flatten(1)
    V = V.flatten(1)
    W = W / torch.linalg.vector_norm(W, dim=-1, keepdim=True).clamp_min(1e-30)
    V = V / torch.linalg.vector_norm(V, dim=-1, keepdim=True).clamp_min(1e-30)
    return W @ V.T


def match_latents(
    W_dec_FSD: torch.Tensor | np.ndarray,
    directions_PSD: torch.Tensor | np.ndarray,
    method: Literal["hungarian", "max"] = "hungarian",
    threshold: float = 0.9,
) -> MatchResult:
    """Match each planted feature to a learned latent.

    ``hungarian``: one-to-one assignment maximising the total cosine
    (``scipy.optimize.linear_sum_assignment``); with fewer latents than features some
    features stay unmatched. ``max``: each feature takes its most similar latent, and a
    latent may serve several features.
    """
    cos_FP = concat_cosine(W_dec_FSD, directions_PSD).numpy()
    F, P = cos_FP.shape
    latent_P = np.full(P, -1, dtype=np.int64)
    cosine_P = np.zeros(P, dtype=np.float64)
    if method == "hungarian":
        rows, cols = linear_sum_assignment(cos_FP, maximize=True)
        latent_P[cols] = rows
        cosine_P[cols] = cos_FP[rows, cols]
    elif method == "max":
        latent_P[:] = cos_FP.argmax(axis=0)
        cosine_P[:] = cos_FP.max(axis=0)
    else:
        raise ConfigError(f"unknown match method {method!r}; use 'hungarian' or 'max'")
    return MatchResult(
        method=method,
        threshold=float(threshold),
        latent_P=latent_P,
        cosine_P=cosine_P,
        nearest_F=cos_FP.argmax(axis=1),
        nearest_cos_F=cos_FP.max(axis=1),
    )


def _ordered(labels: Sequence[str], canonical: Sequence[str]) -> list[str]:
    present = set(labels)
    known = list(dict.fromkeys(c for c in canonical if c in present))
    return known + sorted(present - set(canonical))


@dataclasses.dataclass
class ConfusionMatrix:
    """Counts of planted features by truth (rows) and predicted label (columns)."""

    rows: list[str]
    cols: list[str]
    counts: np.ndarray

    def __getitem__(self, key: tuple[str, str]) -> int:
        return int(self.counts[self.rows.index(key[0]), self.cols.index(key[1])])

    def to_dict(self) -> dict[str, dict[str, int]]:
        return {r: {c: self[r, c] for c in self.cols} for r in self.rows}

    def format(self, row_title: str = "planted") -> str:
        width = max(len(row_title), *(len(r) for r in self.rows))
        col_w = [max(len(c), 4) for c in self.cols]
        head = "  ".join(f"{c:>{w}}" for c, w in zip(self.cols, col_w, strict=True))
        lines = [f"{row_title:<{width}}  {head}"]
        for i, r in enumerate(self.rows):
            cells = "  ".join(f"{int(n):>{w}}" for n, w in zip(self.counts[i], col_w, strict=True))
            lines.append(f"{r:<{width}}  {cells}")
        return "\n".join(lines)


def confusion_matrix(
    predicted: Sequence[str],
    truth: Sequence[str],
    recovered: Sequence[bool] | np.ndarray | None = None,
) -> ConfusionMatrix:
    """Confusion of planted truth labels (rows) against predicted labels (columns).

    ``predicted[p]`` is the label of the latent matched to planted feature p and
    ``truth[p]`` its planted category (or kind, for a finer table). Features whose
    ``recovered[p]`` is False are counted in a ``missed`` column instead.
    """
    predicted = [str(x) for x in predicted]
    truth = [str(x) for x in truth]
    if len(predicted) != len(truth):
        raise DataError(f"got {len(predicted)} predictions for {len(truth)} planted features")
    if recovered is None:
        recovered = np.ones(len(truth), dtype=bool)
    recovered = np.asarray(recovered, dtype=bool)
    if recovered.shape != (len(truth),):
        raise DataError(f"recovered must have one flag per planted feature ({len(truth)})")
    pred = [p if ok else MISSED for p, ok in zip(predicted, recovered, strict=True)]
    rows = _ordered(truth, (*KINDS, *CATEGORIES))
    cols = [c for c in CATEGORIES if c != MISSED] + sorted(set(pred) - set(CATEGORIES) - {MISSED})
    cols.append(MISSED)
    counts = np.zeros((len(rows), len(cols)), dtype=np.int64)
    for t, p in zip(truth, pred, strict=True):
        counts[rows.index(t), cols.index(p)] += 1
    return ConfusionMatrix(rows=rows, cols=cols, counts=counts)


@dataclasses.dataclass
class CategoryScore:
    """Recall and precision of one category label (NaN where undefined)."""

    category: str
    recall: float
    precision: float
    n_planted: int
    n_found: int  # planted features of this category recovered and labelled correctly
    n_labelled: int  # (alive) latents carrying this label
    n_correct: int  # of those, latents whose nearest planted feature is of this category


def precision_recall(
    labels_F: Sequence[str] | np.ndarray,
    match: MatchResult,
    planted_categories: Sequence[str],
    alive_F: Sequence[bool] | np.ndarray | None = None,
) -> dict[str, CategoryScore]:
    """Per planted category: is the label found, and can a latent carrying it be trusted?

    - recall(c) = planted c features whose matched latent has cosine > threshold *and* label
      c, over all planted c features (missed features count against recall).
    - precision(c) = latents labelled c whose nearest planted feature (by concatenated
      cosine) is above threshold *and* of category c, over all latents labelled c. Every
      labelled latent counts, matched or not, because a user reading the list of chat-only
      latents sees all of them; a chat-only latent that explains no planted feature, or whose
      best match is a shared one, is a false discovery. ``alive_F`` (e.g. "fired on held-out
      data") restricts the latents considered; dead latents never reach a user's list.
    """
    labels_F = np.asarray(labels_F).astype(str)
    cats = np.asarray(planted_categories).astype(str)
    if len(cats) != len(match.latent_P):
        raise DataError(f"{len(cats)} categories for {len(match.latent_P)} planted features")
    if len(labels_F) != len(match.nearest_F):
        raise DataError(f"{len(labels_F)} labels for {len(match.nearest_F)} latents")
    alive = np.ones(len(labels_F), bool) if alive_F is None else np.asarray(alive_F, bool)
    matched_label_P = np.where(match.latent_P >= 0, labels_F[np.maximum(match.latent_P, 0)], "")
    nearest_cat_F = cats[match.nearest_F]
    explained_F = match.nearest_cos_F > match.threshold
    scores = {}
    for c in PLANTED_CATEGORIES:
        is_c_P = cats == c
        found = int((is_c_P & match.recovered_P & (matched_label_P == c)).sum())
        labelled_F = alive & (labels_F == c)
        correct = int((labelled_F & explained_F & (nearest_cat_F == c)).sum())
        n_planted, n_labelled = int(is_c_P.sum()), int(labelled_F.sum())
        scores[c] = CategoryScore(
            category=c,
            recall=found / n_planted if n_planted else math.nan,
            precision=correct / n_labelled if n_labelled else math.nan,
            n_planted=n_planted,
            n_found=found,
            n_labelled=n_labelled,
            n_correct=correct,
        )
    return scores


def score_decoder(
    W_dec_FSD: torch.Tensor | np.ndarray,
    data: PlantedData,
    preset: str | CategoryThresholds = "minder",
    method: Literal["hungarian", "max"] = "hungarian",
    threshold: float = 0.9,
    alive_F: Sequence[bool] | np.ndarray | None = None,
    norm_scale_S: torch.Tensor | None = None,
) -> tuple[MatchResult, np.ndarray, ConfusionMatrix, dict[str, CategoryScore]]:
    """Match, label (base = source 0, chat = source 1), and score a decoder against the truth.

    Matching uses the raw decoder (the planted directions are raw); labels use decoder
    norms scaled by ``norm_scale_S`` (a crosscoder's ``folded_scale_S``: the normalised
    units its sparsity saw, as the diffing table does). Returns the match, the [F] labels,
    the confusion matrix by planted kind, and the per-category precision/recall.
    """
    match = match_latents(W_dec_FSD, data.directions_PSD, method=method, threshold=threshold)
    W_label_FSD = torch.as_tensor(W_dec_FSD)
    if norm_scale_S is not None:
        W_label_FSD = W_label_FSD * torch.as_tensor(norm_scale_S)[None, :, None]
    labels_F = classify_latents(W_label_FSD, base=0, chat=1, preset=preset)
    predicted_P = [labels_F[i] if i >= 0 else MISSED for i in match.latent_P]
    confusion = confusion_matrix(predicted_P, data.kinds, match.recovered_P)
    scores = precision_recall(labels_F, match, data.categories, alive_F)
    return match, labels_F, confusion, scores


# --------------------------------------------------------------------------------------------
# Benchmark


def _json_safe(d: dict[str, Any]) -> dict[str, Any]:
    """NaN (an undefined precision or recall) becomes None, which JSON can hold."""
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in d.items()}


@dataclasses.dataclass
class ActivationResult:
    """Scores of one trained crosscoder on the planted data."""

    activation: str
    W_dec_FSD: torch.Tensor
    match: MatchResult
    labels_F: np.ndarray
    alive_F: np.ndarray
    confusion: ConfusionMatrix
    scores: dict[str, CategoryScore]
    fvu_S: list[float]
    l0: float
    train_seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "activation": self.activation,
            "recovery": self.match.recovery,
            "frac_recovered": self.match.frac_recovered,
            "n_alive": int(self.alive_F.sum()),
            "fvu": self.fvu_S,
            "l0": self.l0,
            "train_seconds": self.train_seconds,
            "label_counts": {c: int((self.labels_F[self.alive_F] == c).sum()) for c in CATEGORIES},
            "confusion": self.confusion.to_dict(),
            "scores": {c: _json_safe(dataclasses.asdict(s)) for c, s in self.scores.items()},
        }


@dataclasses.dataclass
class BenchmarkResult:
    """Everything :func:`run_planted_benchmark` measured, plus the settings it used."""

    planted: PlantedConfig
    settings: dict[str, Any]
    results: dict[str, ActivationResult]

    def to_dict(self) -> dict[str, Any]:
        return {
            "planted": self.planted.to_dict(),
            "settings": self.settings,
            "results": {a: r.to_dict() for a, r in self.results.items()},
        }


BENCH_DEFAULTS: dict[str, Any] = {
    "dict_size": 256,
    "k": 4,
    "steps": 2000,
    "batch_size": 1024,
    "lr": 1e-3,
    "l1_coeff": None,
}


@torch.no_grad()
def _evaluate(
    model: Crosscoder, x_NSD: torch.Tensor, batch: int = 4096
) -> tuple[list[float], float, np.ndarray]:
    """FVU per source (pooled over tokens), mean L0, and which latents fired."""
    from crosscoders.metrics import ReconstructionMetrics

    metrics = ReconstructionMetrics(x_NSD.shape[1], x_NSD.shape[2], model.W_dec.shape[0])
    for start in range(0, len(x_NSD), batch):
        x = x_NSD[start : start + batch]
        f_BF = model.encode(x)
        metrics.update(x, model.decode(f_BF), f_BF)
    result = metrics.result()
    return result.fvu_S, result.l0, (metrics.count_F > 0).numpy()


@contextlib.contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    previous = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _train_and_score(
    activation: str,
    data: PlantedData,
    train_NSD: torch.Tensor,
    eval_NSD: torch.Tensor,
    thresholds: CategoryThresholds,
    settings: dict[str, Any],
) -> ActivationResult:
    from crosscoders import CrosscoderConfig, TrainConfig, train

    arch: dict[str, Any] = {"activation": activation}
    if activation in ("topk", "batchtopk"):
        arch["k"] = settings["k"]
    model_cfg = CrosscoderConfig(
        n_sources=2, d_model=data.config.d_model, dict_size=settings["dict_size"], **arch
    )
    train_cfg = TrainConfig(
        steps=settings["steps"],
        batch_size=settings["batch_size"],
        lr=settings["lr"],
        seed=settings["train_seed"],
        l1_coeff=settings["l1_coeff"] if activation == "relu" else None,
        eval_tokens=0,  # held out by the benchmark instead, identically for every activation
        progress=False,
    )
    start = time.perf_counter()
    model = train(model_cfg, train_NSD, train_cfg, run_dir=None)
    seconds = time.perf_counter() - start
    model.eval()
    fvu_S, l0, alive_F = _evaluate(model, eval_NSD)
    W_dec_FSD = model.W_dec.detach().cpu()
    match, labels_F, confusion, scores = score_decoder(
        W_dec_FSD, data, thresholds, settings["method"], settings["threshold"], alive_F,
        model.folded_scale_S.detach().cpu(),
    )
    return ActivationResult(
        activation, W_dec_FSD, match, labels_F, alive_F, confusion, scores, fvu_S, l0, seconds
    )


def run_planted_benchmark(
    cfg: PlantedConfig | None = None,
    activations: Sequence[str] = ("relu", "batchtopk"),
    *,
    dict_size: int = BENCH_DEFAULTS["dict_size"],
    k: int = BENCH_DEFAULTS["k"],
    steps: int = BENCH_DEFAULTS["steps"],
    batch_size: int = BENCH_DEFAULTS["batch_size"],
    lr: float | None = BENCH_DEFAULTS["lr"],
    l1_coeff: float | None = BENCH_DEFAULTS["l1_coeff"],
    preset: str | CategoryThresholds = "minder",
    method: Literal["hungarian", "max"] = "hungarian",
    threshold: float = 0.9,
    train_seed: int = 0,
    eval_tokens: int = 8192,
    num_threads: int | None = None,
) -> BenchmarkResult:
    """Train one crosscoder per activation on planted data and score it against the truth.

    All activations get the same data, dict size, steps, batch, lr and seed. ``k`` applies
    to TopK and BatchTopK, ``l1_coeff`` to ReLU (None: the trainer's default); ``lr=None``
    takes the trainer's default (tuned for long runs: too small for ReLU at 2000 steps).
    The last ``eval_tokens`` tokens are held out for FVU, L0 and the alive mask (a latent is
    alive if it fires on any held-out token). ``num_threads`` sets torch's CPU threads for
    the run and restores them after; on a small shared CPU, 1 avoids oversubscription, which
    can make training several times slower.
    """
    cfg = cfg or PlantedConfig()
    thresholds = get_thresholds(preset)
    data = make_planted_data(cfg)
    n_eval = max(1, min(eval_tokens, cfg.n_tokens // 5))
    train_NSD, eval_NSD = data.acts_NSD[:-n_eval], data.acts_NSD[-n_eval:]
    settings: dict[str, Any] = {
        "dict_size": dict_size,
        "k": k,
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "l1_coeff": l1_coeff,
        "train_seed": train_seed,
        "preset": preset if isinstance(preset, str) else "custom",
        "thresholds": thresholds.to_dict(),
        "method": method,
        "threshold": threshold,
        "eval_tokens": n_eval,
    }
    with _torch_threads(num_threads):
        settings["threads"] = torch.get_num_threads()
        results = {
            a: _train_and_score(a, data, train_NSD, eval_NSD, thresholds, settings)
            for a in activations
        }
    return BenchmarkResult(planted=cfg, settings=settings, results=results)


def _num(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:.2f}"


def format_benchmark_table(result: BenchmarkResult) -> str:
    """A plain-text report: one summary row per activation, then each confusion matrix.

    Columns: recovery (mean matched cosine), recovered (fraction above the threshold),
    alive latents, L0 and FVU (base/chat) on held-out tokens, recall R and precision P of
    the chat-only and base-only labels, how many alive latents carry each, training time.
    """
    p, s = result.planted, result.settings
    t = s["thresholds"]
    counts = ", ".join(f"{kind} {getattr(p, f'n_{kind}')}" for kind in KINDS)
    lines = [
        f"planted: {p.n_features} features ({counts}) in d_model {p.d_model}; "
        f"{p.n_tokens} tokens, fire_prob {p.fire_prob}, seed {p.seed}",
        f"labels: preset {s['preset']} ({t['convention']}: base_only < {t['base_only_below']}, "
        f"chat_only > {t['chat_only_above']}, shared in [{t['shared_low']}, {t['shared_high']}])",
        f"matching: {s['method']}, recovered = cosine > {s['threshold']}; dict_size "
        f"{s['dict_size']}, k {s['k']}, steps {s['steps']}, batch {s['batch_size']}, "
        f"lr {s['lr'] or 'trainer default'}, "
        f"l1_coeff {s['l1_coeff'] or 'trainer default'} (relu)",
        "",
    ]
    cols = [
        ("activation", "<10"),
        ("recovery", ">8"),
        ("recovered", ">9"),
        ("alive", ">5"),
        ("L0", ">5"),
        ("FVU b/c", ">9"),
        ("chat R", ">6"),
        ("chat P", ">6"),
        ("base R", ">6"),
        ("base P", ">6"),
        ("#chat", ">5"),
        ("#base", ">5"),
        ("time s", ">6"),
    ]
    header = " ".join(f"{name:{fmt}}" for name, fmt in cols)
    lines += [header, "-" * len(header)]
    for name, r in result.results.items():
        chat, base = r.scores["chat_only"], r.scores["base_only"]
        cells = [
            name,
            f"{r.match.recovery:.3f}",
            f"{r.match.frac_recovered:.3f}",
            str(int(r.alive_F.sum())),
            f"{r.l0:.1f}",
            "/".join(f"{v:.2f}" for v in r.fvu_S),
            _num(chat.recall),
            _num(chat.precision),
            _num(base.recall),
            _num(base.precision),
            str(chat.n_labelled),
            str(base.n_labelled),
            f"{r.train_seconds:.1f}",
        ]
        lines.append(" ".join(f"{c:{fmt}}" for c, (_, fmt) in zip(cells, cols, strict=True)))
    for name, r in result.results.items():
        lines += ["", f"{name}: planted kind (rows) vs label of its matched latent (columns)"]
        lines.append(r.confusion.format("planted kind"))
    return "\n".join(lines)
