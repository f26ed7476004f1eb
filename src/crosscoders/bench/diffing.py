"""The planted benchmark extended with the two cases that make L1 crosscoders fail.

On top of ``crosscoders.bench.synthetic`` (shared, rotated, base-only, chat-only features, and
``shared_weaker``: a shared feature ``weaker_fraction`` times as strong in one model, the
**complete shrinkage** case: L1 tends to drop the weak side's decoder and call the latent
exclusive), this adds

- ``shared_decoupled`` (**latent decoupling**): one concept present in both models, firing
  on the same tokens, written by a different direction in each model (cosine in
  ``[decoupled_cos_min, decoupled_cos_max]``) and with magnitudes that vary independently
  in the two models (log-normal, ``decoupled_sigma``). The L1 penalty with the sum of
  per-source decoder norms costs the same for one shared latent as for a base-only plus a
  chat-only latent firing together, and the pair reconstructs the independent magnitudes
  better, so L1 is free to split the concept. BatchTopK pays one extra active latent for a
  split.

:func:`run_diffing_benchmark` trains an L1 (ReLU) and a BatchTopK crosscoder on the same
data, builds each one's latent table (relative-norm category and Latent Scaling, one pass)
and scores the preset's labels against the planted truth twice: the category alone, and
with Latent Scaling (an exclusive latent that is not "truly exclusive" is relabelled
shared). :func:`graded_scores` scores the graded view (``crosscoders.diff.graded``): are
features whose strength changed between the models (``shared_shifted`` 20-70%,
``shared_weaker``) called leaning towards the stronger model, and how many unchanged ones
are called leaning. :func:`format_diffing_table` prints it all; ``crosscoders bench
diffing`` runs both.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import numpy as np
import torch

from crosscoders.bench.planted import (
    KIND_TO_CATEGORY,
    PlantedConfig,
    PlantedData,
    make_planted_data,
)
from crosscoders.bench.synthetic import MatchResult, match_latents, precision_recall
from crosscoders.configs import Config
from crosscoders.diff.categories import CATEGORIES, get_thresholds
from crosscoders.diff.graded import GradedConfig
from crosscoders.diff.latent_scaling import TrulyExclusiveRule
from crosscoders.diff.schema import (
    CATEGORY,
    FREQ,
    PRESET_CATEGORY,
    TRULY_BASE_ONLY,
    TRULY_CHAT_ONLY,
    Summary,
)
from crosscoders.diff.table import latent_table, normalised_decoder
from crosscoders.errors import ConfigError

DECOUPLED = "shared_decoupled"
EXCLUSIVE = ("base_only", "chat_only")


@dataclasses.dataclass
class DiffingBenchConfig(Config):
    """Planted data (``planted``), the decoupled features added to it, and training."""

    planted: PlantedConfig = dataclasses.field(default_factory=lambda: PlantedConfig(
        d_model=32, n_shared=24, n_shared_rotated=0, n_shared_weaker=16, n_base_only=8,
        n_chat_only=8, fire_prob=0.03, weaker_fraction=0.3, n_tokens=32768))
    n_decoupled: int = 12
    decoupled_sigma: float = 0.5
    decoupled_cos_min: float = 0.85
    decoupled_cos_max: float = 0.95
    activations: list[str] = dataclasses.field(default_factory=lambda: ["relu", "batchtopk"])
    dict_size: int = 128
    #: designated shared latents (tied decoders, reduced L1), see docs/training.md
    n_shared_latents: int = 0
    k: int = 4
    steps: int = 1500
    batch_size: int = 512
    lr: float = 1e-3
    l1_coeff: float | None = None
    preset: str = "minder"
    match_threshold: float = 0.9
    rule: TrulyExclusiveRule = dataclasses.field(default_factory=TrulyExclusiveRule)
    #: the graded view scored by graded_scores (None: preset labels only)
    graded: GradedConfig | None = dataclasses.field(default_factory=GradedConfig)
    seed: int = 0

    def validate(self) -> None:
        if self.n_decoupled < 0:
            raise ConfigError(f"n_decoupled={self.n_decoupled} must be >= 0")
        if not 0 <= self.decoupled_cos_min <= self.decoupled_cos_max <= 1:
            raise ConfigError("need 0 <= decoupled_cos_min <= decoupled_cos_max <= 1")
        if self.decoupled_sigma < 0:
            raise ConfigError(f"decoupled_sigma={self.decoupled_sigma} must be >= 0")
        unknown = set(self.activations) - {"relu", "topk", "batchtopk", "jumprelu"}
        if unknown:
            raise ConfigError(
                f"unknown activation {sorted(unknown)[0]!r} in activations; use relu, topk, "
                "batchtopk or jumprelu"
            )
        get_thresholds(self.preset)


def make_diffing_data(cfg: DiffingBenchConfig) -> PlantedData:
    """Planted data of ``cfg.planted`` plus ``cfg.n_decoupled`` decoupled shared concepts."""
    base = make_planted_data(cfg.planted)
    if cfg.n_decoupled == 0:
        return base
    n, D, N = cfg.n_decoupled, cfg.planted.d_model, cfg.planted.n_tokens
    gen = torch.Generator().manual_seed(cfg.planted.seed + 7919)
    u = torch.randn(n, D, generator=gen, dtype=torch.float64)
    u /= u.norm(dim=-1, keepdim=True)
    w = torch.randn(n, D, generator=gen, dtype=torch.float64)
    w -= (w * u).sum(-1, keepdim=True) * u
    w /= w.norm(dim=-1, keepdim=True)
    lo, hi = cfg.decoupled_cos_min, cfg.decoupled_cos_max
    cos = lo + (hi - lo) * torch.rand(n, 1, generator=gen, dtype=torch.float64)
    v = cos * u + torch.sqrt(1 - cos**2) * w
    dirs_P2D = torch.stack([u, v], dim=1).float()
    fires = torch.rand(N, n, generator=gen) < cfg.planted.fire_prob
    s = cfg.decoupled_sigma
    common = torch.exp(cfg.planted.magnitude_sigma * torch.randn(N, n, generator=gen)
                       - cfg.planted.magnitude_sigma**2 / 2)
    codes_N2P = torch.stack([
        torch.where(fires, common * torch.exp(s * torch.randn(N, n, generator=gen) - s**2 / 2),
                    torch.zeros(()))
        for _ in range(2)], dim=1)
    acts = base.acts_NSD + torch.einsum("nsp,psd->nsd", codes_N2P, dirs_P2D)
    return PlantedData(
        acts_NSD=acts.contiguous(),
        directions_PSD=torch.cat([base.directions_PSD, dirs_P2D]),
        codes_NP=torch.cat([base.codes_NP, codes_N2P.mean(1)], dim=1),
        kinds=[*base.kinds, *[DECOUPLED] * n],
        categories=[*base.categories, *["shared"] * n],
        config=base.config,
    )


def _source_nearest(W_FSD: torch.Tensor, dirs_PSD: torch.Tensor, source: int
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Per latent, the planted feature whose direction in ``source`` is closest (cosine)."""
    a = W_FSD[:, source].double()
    b = dirs_PSD[:, source].double()
    a = a / a.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    b = b / b.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    cos = a @ b.T
    return cos.argmax(1).numpy(), cos.max(1).values.numpy()


#: planted kinds whose strength is the same in both models (the null of the graded view)
UNCHANGED = ("shared", "shared_rotated")
#: planted kinds whose strength differs between the models (leaning is the right call)
CHANGED = ("shared_shifted", "shared_weaker")


@dataclasses.dataclass
class GradedScore:
    """The graded categories against the planted strength changes.

    Planted features count when their matched latent (Hungarian, concatenated decoder
    cosine above the threshold) fired. A changed feature is *found* when its latent is
    leaning or exclusive towards the model where the feature is stronger, *wrong* when
    towards the other. An unchanged feature is *flagged* when its latent is leaning or
    exclusive. Discoveries are the latents labelled leaning; a discovery is false when its
    nearest planted feature (cosine above the threshold) is unchanged or changed the other
    way, and unexplained when no planted feature is that close (a split or mixed latent);
    ``n_unexplained_same_way`` of those lean the way their nearest planted feature changed.
    """

    fdr: float
    changed: dict[str, dict[str, int]]  # kind -> n, found, wrong
    n_unchanged: int
    n_unchanged_flagged: int
    n_exclusive: int
    n_exclusive_kept: int  # exclusive planted features still labelled exclusive
    n_discoveries: int
    n_false: int
    n_unexplained: int
    n_unexplained_same_way: int

    @property
    def unchanged_flag_rate(self) -> float:
        return self.n_unchanged_flagged / self.n_unchanged if self.n_unchanged else math.nan

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "unchanged_flag_rate": self.unchanged_flag_rate}


def _side(category: str) -> int:
    """+1 chat side, -1 base side, 0 neither."""
    if category in ("chat_leaning", "chat_only"):
        return 1
    if category in ("base_leaning", "base_only"):
        return -1
    return 0


def graded_scores(categories: np.ndarray, alive: np.ndarray, data: PlantedData, match: MatchResult,
                  fdr: float) -> GradedScore:
    """Score graded ``categories`` [F] (alive latents only) against ``data``'s truth."""
    cats = np.asarray(categories).astype(str)
    kinds = np.asarray(data.kinds)
    with np.errstate(divide="ignore"):
        log_ratio_P = np.log(data.strength_ratio)
    changed = {k: {"n": 0, "found": 0, "wrong": 0} for k in CHANGED if k in kinds}
    n_unch = n_unch_flag = n_excl = n_excl_kept = 0
    for p, (kind, latent) in enumerate(zip(kinds, match.latent_P)):
        if latent < 0 or not match.recovered_P[p] or not alive[latent]:
            continue
        side = _side(cats[latent])
        if kind in changed:
            changed[kind]["n"] += 1
            changed[kind]["found"] += int(side == np.sign(log_ratio_P[p]))
            changed[kind]["wrong"] += int(side == -np.sign(log_ratio_P[p]))
        elif kind in UNCHANGED:
            n_unch += 1
            n_unch_flag += int(side != 0)
        elif kind in EXCLUSIVE:
            n_excl += 1
            n_excl_kept += int(cats[latent] == kind)
    leaning = alive & np.isin(cats, ("chat_leaning", "base_leaning"))
    explained = match.nearest_cos_F > match.threshold
    nearest = match.nearest_F
    n_false = n_unexplained = n_same = 0
    for i in np.flatnonzero(leaning):
        if not explained[i]:
            n_unexplained += 1
            n_same += int(_side(cats[i]) == np.sign(log_ratio_P[nearest[i]]))
        elif kinds[nearest[i]] not in CHANGED or _side(cats[i]) != np.sign(
                log_ratio_P[nearest[i]]):
            n_false += 1
    return GradedScore(fdr=fdr, changed=changed, n_unchanged=n_unch,
                       n_unchanged_flagged=n_unch_flag, n_exclusive=n_excl,
                       n_exclusive_kept=n_excl_kept, n_discoveries=int(leaning.sum()),
                       n_false=n_false, n_unexplained=n_unexplained,
                       n_unexplained_same_way=n_same)


@dataclasses.dataclass
class LabelScore:
    """Scores of one labelling of one crosscoder."""

    labels: np.ndarray
    recall: dict[str, float]
    precision: dict[str, float]
    n_labelled: dict[str, int]
    origin: dict[str, dict[str, int]]  # exclusive label -> planted kind it writes -> count


def _score_labels(labels: np.ndarray, alive: np.ndarray, W_FSD: torch.Tensor,
                  data: PlantedData, match: MatchResult) -> LabelScore:
    scores = precision_recall(labels, match, data.categories, alive)
    kinds = np.asarray(data.kinds)
    origin: dict[str, dict[str, int]] = {}
    for label, side in (("chat_only", 1), ("base_only", 0)):
        nearest, cos = _source_nearest(W_FSD, data.directions_PSD, side)
        sel = alive & (labels == label)
        named = np.where(cos[sel] > 0.7, kinds[nearest[sel]], "unmatched")
        origin[label] = {k: int((named == k).sum()) for k in dict.fromkeys(named)}
    return LabelScore(
        labels=labels,
        recall={c: s.recall for c, s in scores.items()},
        precision={c: s.precision for c, s in scores.items()},
        n_labelled={c: int((alive & (labels == c)).sum()) for c in CATEGORIES},
        origin=origin,
    )


def with_latent_scaling(df: Any) -> np.ndarray:
    """The preset's labels after Latent Scaling: exclusive latents that are not truly
    exclusive (or were not scaled) become ``shared``."""
    column = PRESET_CATEGORY if PRESET_CATEGORY in df else CATEGORY
    labels = df[column].to_numpy().astype(object)
    truly = {"chat_only": df[TRULY_CHAT_ONLY].to_numpy(),
             "base_only": df[TRULY_BASE_ONLY].to_numpy()}
    for label in EXCLUSIVE:
        labels[(labels == label) & ~truly[label]] = "shared"
    return labels.astype(str)


def run_diffing_benchmark(cfg: DiffingBenchConfig | None = None, progress: bool = False
                          ) -> dict[str, Any]:
    """Train each activation on the extended planted data and score both labellings.

    Returns a JSON-able dict: settings, and per activation the FVU, L0, alive count,
    Latent Scaling medians, and per labelling (``rel_norm``, ``latent_scaling``) recall,
    precision, label counts and the planted kind each exclusive label writes.
    """
    from crosscoders import CrosscoderConfig, TrainConfig, train

    cfg = cfg or DiffingBenchConfig()
    data = make_diffing_data(cfg)
    out: dict[str, Any] = {"config": cfg.to_dict(), "kinds": _kind_counts(data), "results": {}}
    for activation in cfg.activations:
        arch: dict[str, Any] = {"activation": activation}
        if activation in ("topk", "batchtopk"):
            arch["k"] = cfg.k
        model_cfg = CrosscoderConfig(n_sources=2, d_model=cfg.planted.d_model,
                                     dict_size=cfg.dict_size, source_names=["base", "chat"],
                                     n_shared_latents=cfg.n_shared_latents, seed=cfg.seed,
                                     **arch)
        tkw: dict[str, Any] = {"steps": cfg.steps, "batch_size": cfg.batch_size, "lr": cfg.lr,
                               "seed": cfg.seed, "progress": progress, "eval_tokens": 0}
        if activation == "relu" and cfg.l1_coeff is not None:
            tkw["l1_coeff"] = cfg.l1_coeff
        start = time.perf_counter()
        model = train(model_cfg, data.acts_NSD, TrainConfig(**tkw)).eval()
        seconds = time.perf_counter() - start
        table = latent_table(model, data.acts_NSD, preset=cfg.preset, rule=cfg.rule,
                             latent_scaling="auto", progress=progress, graded=cfg.graded)
        df = table.df
        alive = df[FREQ].to_numpy() > 0
        W = normalised_decoder(model)
        match = match_latents(W, data.directions_PSD, threshold=cfg.match_threshold)
        preset_labels = df[PRESET_CATEGORY if cfg.graded else CATEGORY].to_numpy()
        plain = _score_labels(preset_labels.astype(str), alive, W, data, match)
        scaled = _score_labels(with_latent_scaling(df), alive, W, data, match)
        out["results"][activation] = {
            "fvu": table.summary[Summary.FVU],
            "l0": table.summary[Summary.L0],
            "alive": int(alive.sum()),
            "recovery": match.recovery,
            "train_seconds": seconds,
            "latent_scaling": table.summary.get(Summary.LATENT_SCALING),
            "labels": {"rel_norm": _to_dict(plain), "latent_scaling": _to_dict(scaled)},
        }
        if cfg.graded is not None:
            out["results"][activation]["graded"] = graded_scores(
                df[CATEGORY].to_numpy(), alive, data, match, cfg.graded.fdr).to_dict()
            out["results"][activation]["graded_counts"] = {
                k: v for k, v in table.summary[Summary.COUNTS].items() if v}
    return out


def _kind_counts(data: PlantedData) -> dict[str, int]:
    return {k: data.kinds.count(k) for k in dict.fromkeys(data.kinds)}


def _to_dict(score: LabelScore) -> dict[str, Any]:
    d = dataclasses.asdict(score)
    d.pop("labels")
    return d


def _num(x: float) -> str:
    return "  -" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2f}"


def format_diffing_table(result: dict[str, Any]) -> str:
    """The ground-truth table: per activation and labelling, recall R / precision P of each
    category, how many alive latents carry each exclusive label, and which planted kind the
    exclusive latents actually write (by per-source decoder cosine > 0.7)."""
    cfg = result["config"]
    kinds = ", ".join(f"{k} {n}" for k, n in result["kinds"].items())
    p = cfg["planted"]
    rule = cfg["rule"]
    lines = [
        f"planted: {kinds} (d_model {p['d_model']}, {p['n_tokens']} tokens, shared_weaker at "
        f"{p['weaker_fraction']}x, decoupled cos {cfg['decoupled_cos_min']}-"
        f"{cfg['decoupled_cos_max']} sigma {cfg['decoupled_sigma']})",
        f"crosscoders: dict {cfg['dict_size']}, k {cfg['k']}, {cfg['steps']} steps x "
        f"{cfg['batch_size']}; labels: preset {cfg['preset']}; Latent Scaling: truly exclusive "
        f"if nu_r < {rule['nu_r_max']} and nu_eps < {rule['nu_eps_max']}, else relabelled shared",
        "",
    ]
    head = (f"{'activation':<10} {'labels':<14} {'shared R/P':>11} {'base R/P':>11} "
            f"{'chat R/P':>11} {'#base':>5} {'#chat':>5}  FVU b/c    L0")
    lines += [head, "-" * len(head)]
    for act, res in result["results"].items():
        for name, lab in res["labels"].items():
            rp = [f"{_num(lab['recall'][c])}/{_num(lab['precision'][c])}"
                  for c in ("shared", "base_only", "chat_only")]
            fvu = "/".join(f"{v:.2f}" for v in res["fvu"].values())
            lines.append(
                f"{act:<10} {name:<14} {rp[0]:>11} {rp[1]:>11} {rp[2]:>11} "
                f"{lab['n_labelled']['base_only']:>5} {lab['n_labelled']['chat_only']:>5}  "
                f"{fvu:<9} {res['l0']:5.1f}")
    lines += ["", "what the exclusive latents write (planted kind: count)"]
    for act, res in result["results"].items():
        for name, lab in res["labels"].items():
            for label in EXCLUSIVE:
                origin = ", ".join(f"{k} {n}" for k, n in sorted(lab["origin"][label].items()))
                lines.append(f"  {act:<10} {name:<14} {label:<9}: {origin or '-'}")
    graded = {a: r["graded"] for a, r in result["results"].items() if r.get("graded")}
    if graded:
        fdr = next(iter(graded.values()))["fdr"]
        lines += ["", f"graded view (leaning: relative norm beyond the empirical null, FDR "
                      f"{fdr:g}; planted features whose latent fired)"]
        for act, g in graded.items():
            changed = ", ".join(f"{k} {v['found']}/{v['n']} found ({v['wrong']} wrong way)"
                                for k, v in g["changed"].items())
            lines.append(
                f"  {act:<10} {changed}; unchanged flagged {g['n_unchanged_flagged']}/"
                f"{g['n_unchanged']}; exclusive kept {g['n_exclusive_kept']}/"
                f"{g['n_exclusive']}; leaning latents {g['n_discoveries']} (false "
                f"{g['n_false']}, unexplained {g['n_unexplained']}, of which "
                f"{g['n_unexplained_same_way']} lean the way their nearest feature changed)")
    lines += ["", "Latent Scaling medians (chat-only latents vs random shared control)"]
    for act, res in result["results"].items():
        ls = res["latent_scaling"] or {}
        nr, ne = ls.get("median_nu_r", {}), ls.get("median_nu_eps", {})
        lines.append(
            f"  {act:<10} nu_r {_num(nr.get('chat_only'))} vs {_num(nr.get('shared_control'))}"
            f", nu_eps {_num(ne.get('chat_only'))} vs {_num(ne.get('shared_control'))}; "
            f"truly chat-only {ls.get('n_truly_chat_only')}/{ls.get('n_chat_only_scaled')}, "
            f"truly base-only {ls.get('n_truly_base_only')}/{ls.get('n_base_only_scaled')}")
    return "\n".join(lines)


__all__ = [
    "DECOUPLED",
    "KIND_TO_CATEGORY",
    "DiffingBenchConfig",
    "GradedScore",
    "format_diffing_table",
    "graded_scores",
    "make_diffing_data",
    "run_diffing_benchmark",
    "with_latent_scaling",
]
