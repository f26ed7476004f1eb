"""Graded diffs: a calibrated null for the relative decoder norm, per-latent scores with
false-discovery control, and the ``chat_leaning`` / ``base_leaning`` categories.

The preset thresholds (``categories.py``) only see the trimodal picture: a latent is
exclusive near 0 or 1 and shared in between. A real fine-tune shifts many features part of
the way, and a latent whose chat decoder is 1.5x its base decoder (``rel_norm`` 0.6) is
"shared" to every preset. Here each latent gets a score of how far its log norm ratio
``t = log(n_chat / n_base)`` lies from what unchanged latents show.

**The null** is an *empirical null* (Efron's large-scale-inference setting): thousands of
parallel tests whose null distribution is not known theoretically, but many of which are
null. The spread of ``t`` among unchanged latents comes from training noise and from
interference between features; neither has a closed form, but both act on the whole
dictionary. A normal is fitted to the core of the distribution of ``t`` over the latents
that can be tested: starting at its mode (the shortest window holding a fifth of them),
the fit keeps the latents within ``clip`` null standard deviations of the centre and
iterates (their precision-weighted mean and, by maximum likelihood, the variance, corrected
for the truncation at ``+-clip``), so latents that really changed, which sit in the tails,
do not widen it, even when they outnumber the unchanged ones. The centre is fitted, not
assumed to be 0, so a global scale difference between the sources is not called a change.

Which latents can be tested: not exclusive under the preset (those are labelled already),
not designated (tied or masked decoders fix the ratio by design), and trained. With data, a
latent is trained if it fired at least ``min_fires`` times on the analysed tokens; latents
that never fired are ``dead`` and the others below ``min_fires`` ``rare``: they keep
(nearly) their random initial decoders, so their ``t`` says nothing about the models and
they are counted apart, never as shared. Without data, a latent is tested if its base and
chat decoder directions agree (cosine >= ``min_cos``): untrained latents keep independent
random directions per source (cosine ~ 0), trained ones mostly do not.

The spread of ``t`` depends on how often a latent fires: a latent that fires on 30 tokens
is fitted from 30 examples, one that fires on 3000 from 3000. On planted data the frequent
latents that write an unchanged feature agree to a few parts in a thousand while latents
firing a few dozen times scatter by tens of percent, so one variance for all would be set
by the frequent majority and call most rare latents leaning. With data, the null variance
of latent i is therefore ``floor^2 + per_firing^2 / n_i`` (``n_i`` its firings on the
analysed tokens): a floor for what training and interference leave on every latent, plus
the ``1 / n`` term of an estimate made from ``n`` examples. Without data it is ``floor^2``.

**Scores**: ``rel_norm_z = (t - center) / scale``; a two-sided normal p-value;
Benjamini-Hochberg over the tested latents gives ``rel_norm_q``; a latent with
``rel_norm_q <= fdr`` whose norm ratio also differs from the null centre by at least
``min_change`` (10%: ``|t - center| >= log(1.1)``) is ``chat_leaning`` (z > 0) or
``base_leaning``. The second condition is the fold-change cut of a volcano plot: a latent
that fires thousands of times can have a 3% norm difference that is statistically real (the
data along its decoder confirms it) but is an artefact of how the crosscoder split its
features, not a change worth reading. It only removes discoveries, so the FDR of what is
left is no higher than BH's. ``diff_score`` is
``|rel_norm_z|`` (exclusive latents included, dead and rare ones NaN): the report's
feature browser opens sorted by it.

**Latent Scaling ratios** get the same treatment with the random shared control of Latent
Scaling as the null sample (it is a sample of latents labelled shared and not leaning):
``nu_r_z`` and ``nu_eps_z`` are robust z-scores against the control's median and MAD, and
``ls_q`` is the BH q-value of ``nu_eps`` lying below the control (the other model's
activation carries less of the direction), over the scaled exclusive and leaning latents.

Validation on planted ground truth (``crosscoders.bench.diffing``, docs/diffing.md):
features 20-70% stronger in one model come out leaning towards that model, unchanged shared
features are flagged at a rate below ``fdr``, exclusive ones stay exclusive.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
from scipy.stats import norm

from crosscoders.configs import Config
from crosscoders.diff.categories import CATEGORIES
from crosscoders.diff.schema import (
    CATEGORY,
    DEC_COS,
    DIFF_SCORE,
    LATENT,
    LS_Q,
    NORM_BASE,
    NORM_CHAT,
    NU_EPS,
    NU_EPS_Z,
    NU_R,
    NU_R_Z,
    PRESET_CATEGORY,
    REL_NORM_P,
    REL_NORM_Q,
    REL_NORM_Z,
)
from crosscoders.errors import ConfigError

LEANING: tuple[str, ...] = ("chat_leaning", "base_leaning")
UNTRAINED: tuple[str, ...] = ("rare", "dead")
#: every value the graded ``category`` column can take
GRADED_CATEGORIES: tuple[str, ...] = (*CATEGORIES, *LEANING, *UNTRAINED)
EXCLUSIVE: tuple[str, ...] = ("base_only", "chat_only")


@dataclasses.dataclass
class GradedConfig(Config):
    """How the graded view is computed (see the module docstring)."""

    fdr: float = 0.05  # Benjamini-Hochberg level for the leaning labels
    min_fires: int = 10  # latents firing fewer times on the analysed tokens are rare / dead
    clip: float = 2.5  # the null is fitted to latents within clip null SDs of its centre
    min_null: int = 20  # fewest testable latents to fit a null; fewer: no leaning labels
    min_cos: float = 0.5  # weights only: tested latents need decoder cosine >= min_cos
    min_change: float = 0.1  # leaning also needs n_chat / n_base beyond center by 10%
    max_leaning: int = 256  # per side, leaning candidates given Latent Scaling and examples

    def validate(self) -> None:
        if not 0 < self.fdr < 1:
            raise ConfigError(f"fdr={self.fdr} must lie in (0, 1), e.g. 0.05")
        if self.min_fires < 1:
            raise ConfigError(f"min_fires={self.min_fires} must be >= 1")
        if not self.clip > 1:
            raise ConfigError(f"clip={self.clip} must be > 1 (null SDs), e.g. 2.5")
        if self.min_null < 3:
            raise ConfigError(f"min_null={self.min_null} must be >= 3")
        if self.min_change < 0:
            raise ConfigError(f"min_change={self.min_change} must be >= 0 (0: no margin)")
        if self.max_leaning < 0:
            raise ConfigError(f"max_leaning={self.max_leaning} must be >= 0")


#: the default of ``latent_table(graded=...)`` (never modified)
DEFAULT_GRADED = GradedConfig()


# --------------------------------------------------------------------------------------------
# The null and the tests


def log_norm_ratio(norm_base: np.ndarray, norm_chat: np.ndarray) -> np.ndarray:
    """``t = log(n_chat / n_base)`` per latent (= logit of rel_norm), finite everywhere:
    zero norms are floored at 1e-6 of the largest norm; both zero gives 0."""
    nb = np.asarray(norm_base, dtype=np.float64)
    nc = np.asarray(norm_chat, dtype=np.float64)
    top = max(float(np.max(nb, initial=0.0)), float(np.max(nc, initial=0.0)))
    eps = 1e-6 * top if top > 0 else 1e-300
    t = np.log(np.maximum(nc, eps)) - np.log(np.maximum(nb, eps))
    return np.where((nb <= 0) & (nc <= 0), 0.0, t)


@dataclasses.dataclass
class NullFit:
    """The null ``N(center, floor^2 + per_firing^2 / n_fires)`` fitted to ``n`` values, of
    which ``n_core`` lay within ``clip`` null SDs of the centre at convergence."""

    center: float
    floor: float
    per_firing: float
    n: int
    n_core: int

    def scale(self, fires: np.ndarray | float | None = None) -> np.ndarray | float:
        """Null SD of a latent that fired ``fires`` times (None: the floor)."""
        if fires is None:
            return self.floor
        n = np.maximum(np.asarray(fires, dtype=np.float64), 1.0)
        return np.sqrt(self.floor**2 + self.per_firing**2 / n)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _truncated_variance_factor(clip: float) -> float:
    """Var of N(0, 1) restricted to [-clip, clip]."""
    mass = 2 * norm.cdf(clip) - 1
    return 1 - 2 * clip * norm.pdf(clip) / mass


def _densest(x: np.ndarray, k: int) -> tuple[float, float]:
    """Median and half-width of the shortest window holding ``k`` of the values."""
    xs = np.sort(x)
    widths = xs[k - 1:] - xs[: xs.size - k + 1]
    i = int(np.argmin(widths))
    return float(np.median(xs[i: i + k])), float(widths[i]) / 2


def fit_null(values: np.ndarray, fires: np.ndarray | None = None, clip: float = 2.5,
             max_iter: int = 200, start_fraction: float = 0.2) -> NullFit:
    """Fit the null to the core of ``values`` (iterated clipping at ``clip`` null SDs).

    Start: the densest ``start_fraction`` of the values (the shortest window holding them:
    its median, and its half-width read as the quartile distance of a normal), so the fit
    begins at the mode of the unchanged latents even when they are a minority and the
    changed ones spread widely on both sides. Each step keeps the values within ``clip``
    null SDs of the centre and re-estimates the centre (their precision-weighted mean) and
    the variance parameters (maximum likelihood on the kept values, the variance scaled by
    that of a standard normal truncated at ``+-clip``). Values far in the tails (the
    changed latents) never enter; unchanged latents beyond ``clip`` are few and accounted
    for by the truncation factor. ``fires`` [n]: firings per value, for the ``per_firing / n`` term
    (None: a single variance, ``per_firing`` = 0). The returned scale is raised by one
    standard error of its estimate, ``1 + 1 / sqrt(2 (n_core - 2))``: noise in an estimated
    scale makes tail p-values too small on average (simulated: 1.4x too many null values
    beyond 3.5 SDs at 360 latents without it).
    """
    from scipy.optimize import minimize

    x = np.asarray(values, dtype=np.float64)
    n = np.ones_like(x) if fires is None else np.maximum(np.asarray(fires, np.float64), 1.0)
    ok = np.isfinite(x)
    x, n = x[ok], n[ok]
    if x.size < 3:
        raise ConfigError(f"need at least 3 values to fit a null, got {x.size}")
    center, half = _densest(x, max(3, math.ceil(start_fraction * x.size)))
    spread = half / float(norm.ppf(0.75))
    spread = spread if spread > 0 else float(np.std(x)) or 1e-12
    k = _truncated_variance_factor(clip)
    floor, per = spread, (0.0 if fires is None else spread * float(np.sqrt(np.median(n))) / 4)
    for _ in range(max_iter):
        var = floor**2 + per**2 / n
        keep = np.abs(x - center) <= clip * np.sqrt(var)
        if keep.sum() < 3:
            break
        xk, nk, wk = x[keep], n[keep], 1.0 / var[keep]
        new_center = float(np.sum(wk * xk) / np.sum(wk))
        r2 = (xk - new_center) ** 2
        if fires is None:
            new_floor, new_per = max(float(np.sqrt(r2.mean() / k)), 1e-12), 0.0
        else:
            def nll(log_ab: np.ndarray, r2=r2, nk=nk) -> float:
                a, b = np.exp(log_ab)
                v = k * (a * a + b * b / nk)
                return float(np.sum(np.log(v) + r2 / v))

            start = np.log([max(floor, 1e-12), max(per, 1e-12)])
            res = minimize(nll, start, method="Nelder-Mead",
                           options={"xatol": 1e-7, "fatol": 1e-10, "maxiter": 4000})
            new_floor, new_per = (float(v) for v in np.exp(res.x))
        done = (abs(new_center - center) <= 1e-9 * spread
                and abs(new_floor - floor) <= 1e-6 * max(floor, 1e-12)
                and abs(new_per - per) <= 1e-6 * max(per, 1e-12))
        center, floor, per = new_center, new_floor, new_per
        if done:
            break
    keep = np.abs(x - center) <= clip * np.sqrt(floor**2 + per**2 / n)
    # An underestimated scale shrinks tail p-values more than an overestimated one enlarges
    # them, so the scale is raised by one standard error of its estimate.
    inflate = 1.0 + 1.0 / math.sqrt(2.0 * max(int(keep.sum()) - 2, 1))
    return NullFit(center=center, floor=floor * inflate, per_firing=per * inflate,
                   n=int(x.size), n_core=int(keep.sum()))


def bh_qvalues(p: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (q-values) of ``p``; NaN stays NaN."""
    p = np.asarray(p, dtype=np.float64)
    q = np.full(p.shape, np.nan)
    ok = np.isfinite(p)
    m = int(ok.sum())
    if m == 0:
        return q
    order = np.argsort(p[ok], kind="stable")
    ranked = p[ok][order] * m / np.arange(1, m + 1)
    ranked = np.minimum.accumulate(ranked[::-1])[::-1]
    out = np.empty(m)
    out[order] = np.minimum(ranked, 1.0)
    q[ok] = out
    return q


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# --------------------------------------------------------------------------------------------
# Grading a table


def testable(cols: dict[str, np.ndarray], fires: np.ndarray | None,
             cfg: GradedConfig, fixed: np.ndarray | None = None) -> np.ndarray:
    """[F] bool: latents whose relative norm is tested (see the module docstring);
    ``fixed`` [F] marks latents whose norm ratio is fixed by design (designated shared or
    exclusive latents), never tested."""
    preset = np.asarray(cols.get(PRESET_CATEGORY, cols[CATEGORY])).astype(str)
    ok = ~np.isin(preset, EXCLUSIVE)
    if fixed is not None:
        ok &= ~np.asarray(fixed, bool)
    if fires is not None:
        return ok & (np.asarray(fires) >= cfg.min_fires)
    return ok & (np.asarray(cols[DEC_COS]) >= cfg.min_cos)


def grade(cols: dict[str, np.ndarray], fires: np.ndarray | None = None,
          cfg: GradedConfig | None = None, fixed: np.ndarray | None = None,
          ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The graded columns and summary for a table's weight columns.

    ``cols`` needs ``norm_base``, ``norm_chat``, ``category`` (the preset's labels) and
    ``dec_cos``; ``fires`` [F] is how often each latent fired on the analysed tokens (None:
    weights only); ``fixed`` [F] marks designated latents (tied or masked decoders: their
    norm ratio is set by design, and a tied block would be a spike at 0 in the null).
    Returns new columns (``preset_category``, the graded ``category``, ``rel_norm_z``,
    ``rel_norm_p``, ``rel_norm_q``, ``diff_score``) and the summary entry.
    """
    cfg = cfg or GradedConfig()
    preset = np.asarray(cols[CATEGORY]).astype(str)
    F_ = len(preset)
    t = log_norm_ratio(cols[NORM_BASE], cols[NORM_CHAT])
    tested = testable({CATEGORY: preset, DEC_COS: cols[DEC_COS]}, fires, cfg, fixed)
    exclusive = np.isin(preset, EXCLUSIVE)
    category = preset.astype(object).copy()
    if fires is not None:
        fires = np.asarray(fires)
        category[~exclusive & (fires == 0)] = "dead"
        category[~exclusive & (fires > 0) & (fires < cfg.min_fires)] = "rare"

    z = np.full(F_, np.nan)
    p = np.full(F_, np.nan)
    q = np.full(F_, np.nan)
    summary: dict[str, Any] = {
        "method": "empirical null: a normal with variance floor^2 + per_firing^2 / n_fires, "
                  "fitted to the core of log(n_chat / n_base) over the tested latents; "
                  "Benjamini-Hochberg over them",
        "fdr": cfg.fdr, "min_fires": cfg.min_fires if fires is not None else None,
        "tested": (f"not exclusive, fired >= {cfg.min_fires} times" if fires is not None
                   else f"not exclusive, decoder cosine >= {cfg.min_cos} (weights only)"),
        "n_tested": int(tested.sum()), "null": None, "z_threshold": None, "band": None,
    }
    if tested.sum() < cfg.min_null:
        summary["note"] = (f"only {int(tested.sum())} latents can be tested (need "
                           f"{cfg.min_null}); no null fitted, no leaning labels")
    else:
        fit = fit_null(t[tested], None if fires is None else fires[tested], cfg.clip)
        scale = fit.scale(fires) if fires is not None else np.full(F_, fit.floor)
        z = (t - fit.center) / scale
        p = 2 * norm.sf(np.abs(z))
        q[tested] = bh_qvalues(p[tested])
        margin = math.log1p(cfg.min_change)
        leaning = tested & (q <= cfg.fdr) & (np.abs(t - fit.center) >= margin)
        category[leaning & (z > 0)] = "chat_leaning"
        category[leaning & (z < 0)] = "base_leaning"
        # the BH cut-off: k rejections of m tests reject every p <= k * fdr / m (k >= 1:
        # what the first rejection would need)
        k = max(1, int((q[tested] <= cfg.fdr).sum()))
        z_star = float(norm.isf(k * cfg.fdr / (2 * tested.sum())))
        summary["z_threshold"] = z_star
        summary["null"] = fit.to_dict()
        # the band drawn in the report: at the median firing count of the tested latents
        typical = float(np.median(fires[tested])) if fires is not None else None
        sd = float(fit.scale(typical))
        summary["null"].update(typical_fires=typical, typical_scale=sd)
        if fires is not None:
            summary["null"]["scale_at_fires"] = {
                str(f): float(fit.scale(f)) for f in (10, 100, 1000, 10000)}
        half = max(z_star * sd, margin)
        summary["band"] = [_sigmoid(fit.center - half), _sigmoid(fit.center + half)]
        summary["min_change"] = cfg.min_change
        for side, sign in (("chat_leaning", 1.0), ("base_leaning", -1.0)):
            idx = np.flatnonzero(category == side)
            summary[f"top_{side}"] = idx[np.argsort(-sign * z[idx], kind="stable")][:20].tolist()
    keep = tested | exclusive
    for arr in (z, p):
        arr[~keep] = np.nan
    category = category.astype(str)
    summary["n_chat_leaning"] = int((category == "chat_leaning").sum())
    summary["n_base_leaning"] = int((category == "base_leaning").sum())
    summary["n_dead"] = int((category == "dead").sum())
    summary["n_rare"] = int((category == "rare").sum())
    columns = {
        PRESET_CATEGORY: preset,
        CATEGORY: category,
        REL_NORM_Z: z,
        REL_NORM_P: p,
        REL_NORM_Q: q,
        DIFF_SCORE: np.abs(z),
    }
    return columns, summary


def leaning_candidates(cols: dict[str, np.ndarray], cfg: GradedConfig | None = None,
                       fixed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Before the data pass: the latents most likely to come out leaning, at most
    ``max_leaning`` per side (chat, base), by the weights-only score (|z| >= 1.5 and not
    exclusive). They get Latent Scaling and examples in the one pass."""
    cfg = cfg or GradedConfig()
    graded, _ = grade({k: cols[k] for k in (NORM_BASE, NORM_CHAT, CATEGORY, DEC_COS)},
                      None, cfg, fixed)
    z = graded[REL_NORM_Z]
    preset = np.asarray(cols[CATEGORY]).astype(str)
    ok = np.isfinite(z) & ~np.isin(preset, EXCLUSIVE) & (np.abs(np.nan_to_num(z)) >= 1.5)
    out = []
    for sign in (1.0, -1.0):
        idx = np.flatnonzero(ok & (sign * np.nan_to_num(z) > 0))
        idx = idx[np.argsort(-sign * z[idx], kind="stable")][: cfg.max_leaning]
        out.append(np.sort(idx))
    return out[0], out[1]


# --------------------------------------------------------------------------------------------
# Latent Scaling ratios against the shared control


def ls_scores(cols: dict[str, np.ndarray], control: np.ndarray, fdr: float = 0.05,
              min_control: int = 10) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """``nu_r_z``, ``nu_eps_z`` (robust z against the control's median and 1.4826 MAD) for
    every scaled latent, and ``ls_q``: BH q-value of ``nu_eps`` below the control, over the
    scaled latents that are exclusive or leaning. ``control`` [F] bool marks the null
    sample (the shared control, still labelled shared)."""
    F_ = len(cols[LATENT])
    out = {name: np.full(F_, np.nan) for name in (NU_R_Z, NU_EPS_Z, LS_Q)}
    summary: dict[str, Any] = {"n_control": 0}
    if NU_R not in cols:
        return out, summary
    category = np.asarray(cols[CATEGORY]).astype(str)
    scaled = np.isfinite(cols[NU_R]) & np.isfinite(cols[NU_EPS])
    control = np.asarray(control, bool) & scaled
    summary["n_control"] = int(control.sum())
    if control.sum() < min_control:
        summary["note"] = (f"{int(control.sum())} control latents (need {min_control}); no "
                           "Latent Scaling scores")
        return out, summary
    for name, z_name in ((NU_R, NU_R_Z), (NU_EPS, NU_EPS_Z)):
        ref = cols[name][control]
        center = float(np.median(ref))
        scale = 1.4826 * float(np.median(np.abs(ref - center)))
        scale = scale if scale > 0 else float(np.std(ref)) or 1e-12
        out[z_name] = np.where(scaled, (cols[name] - center) / scale, np.nan)
        summary[name] = {"center": center, "scale": scale}
    tested = scaled & np.isin(category, (*EXCLUSIVE, *LEANING))
    p = np.where(tested, norm.cdf(out[NU_EPS_Z]), np.nan)
    out[LS_Q] = bh_qvalues(p)
    summary["n_tested"] = int(tested.sum())
    summary["n_below_null"] = int((out[LS_Q] <= fdr).sum())
    for side in LEANING:
        sel = tested & (category == side)
        summary[f"n_{side}_scaled"] = int(sel.sum())
        summary[f"n_{side}_confirmed"] = int((sel & (out[LS_Q] <= fdr)).sum())
    return out, summary
