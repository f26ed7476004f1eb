"""The latent table: one row per latent for two chosen sources (base, chat) of a crosscoder.

Its columns, with dtype, meaning and which run writes them, are listed in
``crosscoders.diff.schema`` (the names both this module and the report use). In short:
decoder norms, relative norms (``rel_norm``, Minder's ``dnorm``) and the ``category`` from
the weights; the graded view (``crosscoders.diff.graded``: ``chat_leaning`` /
``base_leaning`` beyond the null at the chosen FDR, ``dead`` / ``rare`` for latents that
(nearly) never fired, ``diff_score``); firing statistics with data; Latent Scaling betas
and ratios for a subset (NaN outside it; ``ls_ref`` the reference source: chat for
chat-only latents and the shared control, base for base-only latents, mirrored).

The source names (``model.config.names``) appear only in the summary; the table always says
``base`` and ``chat`` so that notebooks can rely on them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from crosscoders.data import as_source
from crosscoders.diff.categories import (
    CATEGORIES,
    CategoryThresholds,
    get_thresholds,
    labels_from_scores,
    minder_norm_diff,
    relative_norm,
)
from crosscoders.diff.graded import (
    DEFAULT_GRADED,
    GRADED_CATEGORIES,
    GradedConfig,
    grade,
    leaning_candidates,
    ls_scores,
)
from crosscoders.diff.latent_scaling import (
    LatentScalingAccumulator,
    TrulyExclusiveRule,
    pick_latents,
)
from crosscoders.diff.schema import (
    BETA_BASE_ERR,
    BETA_BASE_RECON,
    BETA_CHAT_ERR,
    BETA_CHAT_RECON,
    CATEGORY,
    COS,
    DEC_COS,
    DNORM,
    ENC_COS,
    FREQ,
    LATENT,
    LS_REF,
    N_FIRES,
    NORM_BASE,
    NORM_CHAT,
    NU_EPS,
    NU_R,
    PRESET_CATEGORY,
    REL_NORM,
    TRULY_BASE_ONLY,
    TRULY_CHAT_ONLY,
    TRULY_EXCLUSIVE,
    Files,
    Summary,
)
from crosscoders.diff.stats import ActivationStats, analysis_pass
from crosscoders.errors import ConfigError
from crosscoders.io import atomic_write, json_default, read_json, write_json

if TYPE_CHECKING:
    from crosscoders.data import ActivationData
    from crosscoders.model import Crosscoder


def resolve_source(model: Crosscoder, source: int | str) -> int:
    """A source index from an index or a source name (``config.source_names``)."""
    names = model.config.names
    if isinstance(source, str) and not source.lstrip("-").isdigit():
        if source not in names:
            raise ConfigError(f"no source named {source!r}; the crosscoder's sources are {names}")
        return names.index(source)
    index = int(source)
    if not -len(names) <= index < len(names):
        raise ConfigError(
            f"source {index} is out of range; the crosscoder has {len(names)} (use 0.."
            f"{len(names) - 1} or a name: {', '.join(names)})"
        )
    return index % len(names)


def normalised_decoder(model: Crosscoder) -> torch.Tensor:
    """[F, S, D] decoder in the normalised units the crosscoder was trained in."""
    return (model.W_dec.detach() * model.folded_scale_S.detach()[None, :, None]).cpu()


def weight_columns(
    model: Crosscoder,
    base: int | str = 0,
    chat: int | str = 1,
    preset: str | CategoryThresholds = "minder",
) -> dict[str, np.ndarray]:
    """Columns that need only the weights: norms, relative norms, category, cosines."""
    b, c = resolve_source(model, base), resolve_source(model, chat)
    if b == c:
        raise ConfigError(
            f"base and chat must be different sources, got {b} twice; give --base and --chat"
        )
    thresholds = get_thresholds(preset)
    W = normalised_decoder(model)
    norms_FS = model.decoder_norms().detach().cpu()
    rel = relative_norm(W, b, c)
    dnorm = minder_norm_diff(W, b, c)
    score = rel if thresholds.convention == "rel_norm" else dnorm
    enc = model.W_enc.detach().cpu()  # [S, D, F]
    dec_cos = _cosine(W[:, b], W[:, c])
    return {
        LATENT: np.arange(W.shape[0]),
        NORM_BASE: norms_FS[:, b].double().numpy(),
        NORM_CHAT: norms_FS[:, c].double().numpy(),
        REL_NORM: rel.double().numpy(),
        DNORM: dnorm.double().numpy(),
        CATEGORY: labels_from_scores(score, thresholds),
        COS: dec_cos,
        DEC_COS: dec_cos,
        ENC_COS: _cosine(enc[b].T, enc[c].T),
    }


def designated_latents(model: Crosscoder, base: int, chat: int) -> np.ndarray:
    """[F] bool: latents whose base/chat norm ratio is fixed by design (designated shared
    latents with tied decoders, latents masked off either source)."""
    F_ = int(model.dict_size)
    fixed = np.arange(F_) < int(getattr(model.config, "n_shared_latents", 0) or 0)
    mask = getattr(model, "dec_mask_FS", None)
    if mask is not None:
        mask = mask.detach().cpu().numpy()
        fixed |= (mask[:, base] == 0) | (mask[:, chat] == 0)
    return fixed


def _cosine(a_FD: torch.Tensor, b_FD: torch.Tensor) -> np.ndarray:
    a, b = a_FD.double(), b_FD.double()
    denom = a.norm(dim=-1) * b.norm(dim=-1)
    cos = (a * b).sum(-1) / denom.clamp_min(1e-300)
    return torch.where(denom > 0, cos, torch.zeros_like(cos)).numpy()


@dataclass
class LatentTable:
    """The per-latent table (a pandas DataFrame) and its JSON-able summary."""

    df: Any
    summary: dict[str, Any] = field(default_factory=dict)

    def save(self, out_dir: str | Path) -> Path:
        """Write ``latents.parquet``, ``latents.csv`` and ``summary.json`` (atomically)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / Files.LATENTS_PARQUET,
                     lambda tmp: self.df.to_parquet(tmp, index=False))
        atomic_write(out / Files.LATENTS_CSV, lambda tmp: self.df.to_csv(tmp, index=False))
        write_json(out / Files.SUMMARY, self.summary, default=json_default)
        return out

    @classmethod
    def load(cls, out_dir: str | Path) -> LatentTable:
        import pandas as pd

        out = Path(out_dir)
        return cls(pd.read_parquet(out / Files.LATENTS_PARQUET),
                   read_json(out / Files.SUMMARY))


def latent_table(
    model: Crosscoder,
    data: ActivationData | None = None,
    *,
    base: int | str = 0,
    chat: int | str = 1,
    preset: str | CategoryThresholds = "minder",
    token_ids: Any = None,
    special_ids: Any = None,
    latent_scaling: str | Any = "auto",
    rule: TrulyExclusiveRule | None = None,
    max_ls_latents: int | None = None,
    seed: int = 42,
    batch_size: int = 4096,
    progress: bool = True,
    extra_consumers: tuple = (),
    graded: GradedConfig | None = DEFAULT_GRADED,
) -> LatentTable:
    """Build the latent table; with ``data`` everything comes from one pass over it.

    ``data``: a tensor [N, S, D] (``token_ids`` [N] optional), an ``ActivationStore`` or a
    store directory; None gives the weight columns only. ``latent_scaling``: ``"auto"``
    (chat-only latents with a random shared control of the same size, at least 100,
    referenced to chat; base-only latents referenced to base; and with ``graded`` the
    ``graded.max_leaning`` most chat- and base-leaning candidates per side, referenced to
    their stronger side), ``"all"`` (every latent, referenced to chat), ``"none"``, or an
    array of latent indices (referenced to chat). ``max_ls_latents`` caps each exclusive set
    (the most exclusive first). ``extra_consumers`` ride on the same pass (e.g. an examples
    collector). ``graded``: the graded view (``crosscoders.diff.graded``; None: the preset's
    labels alone, as ``category``).
    """
    import pandas as pd

    b, c = resolve_source(model, base), resolve_source(model, chat)
    thresholds = get_thresholds(preset)
    cols = weight_columns(model, b, c, thresholds)
    names = model.config.names
    summary: dict[str, Any] = {
        Summary.SOURCES: {"base": names[b], "chat": names[c], "base_index": b,
                          "chat_index": c},
        Summary.PRESET: preset if isinstance(preset, str) else "custom",
        Summary.THRESHOLDS: thresholds.to_dict(),
        "rel_norm_conventions": {
            REL_NORM: "n_chat / (n_base + n_chat): 0 base-only, 0.5 shared, 1 chat-only",
            DNORM: "0.5 * (1 + (n_chat - n_base) / max(n_base, n_chat)): 1 chat-only",
            "category_uses": thresholds.convention,
        },
        Summary.N_LATENTS: int(model.dict_size),
    }
    fixed = designated_latents(model, b, c)
    if data is None:
        if graded is not None:
            new, summary[Summary.GRADED] = grade(cols, None, graded, fixed)
            cols.update(new)
        _add_counts(summary, cols, graded)
        return LatentTable(pd.DataFrame(cols), summary)

    source = as_source(data, token_ids=token_ids)
    stats = ActivationStats(model.dict_size, model.n_sources, model.d_model, special_ids)
    candidates = (leaning_candidates(cols, graded, fixed) if graded is not None
                  and isinstance(latent_scaling, str) and latent_scaling == "auto"
                  else (np.empty(0, np.int64), np.empty(0, np.int64)))
    ls_runs = _latent_scaling_runs(cols, latent_scaling, max_ls_latents, seed, candidates,
                                   min_control=100 if graded is not None else 0)
    accs = [
        (
            LatentScalingAccumulator(
                model, idx, ref=c if ref == "chat" else b, other=b if ref == "chat" else c
            ),
            ref,
        )
        for idx, ref in ls_runs
        if len(idx)
    ]
    analysis_pass(
        model,
        source,
        [stats, *(a for a, _ in accs), *extra_consumers],
        batch_size,
        progress=progress,
        desc="latent table",
    )
    cols.update(stats.per_latent())
    rec = stats.summary()
    rec[Summary.FVU] = {names[s]: v for s, v in enumerate(rec[Summary.FVU])}
    summary.update(rec)
    if graded is not None:
        new, summary[Summary.GRADED] = grade(cols, cols[N_FIRES], graded, fixed)
        cols.update(new)
    _add_counts(summary, cols, graded)
    if ls_runs:
        _add_latent_scaling(cols, [(a.result(), ref) for a, ref in accs], rule)
        control = (cols[CATEGORY] == "shared") & (cols[LS_REF] == "chat") & ~np.isin(
            cols[LATENT], np.concatenate(candidates))
        ls = summary[Summary.LATENT_SCALING] = _ls_summary(cols, rule, latent_scaling, control)
        if graded is not None:
            new, ls["null"] = ls_scores(cols, control, graded.fdr)
            cols.update(new)
            ls["n_leaning_candidates"] = {
                "chat": int(len(candidates[0])), "base": int(len(candidates[1]))}
    return LatentTable(pd.DataFrame(cols), summary)


def _add_counts(summary: dict[str, Any], cols: dict[str, np.ndarray],
                graded: GradedConfig | None) -> None:
    """``counts`` (every category of ``category``), ``preset_counts`` (the preset's labels
    alone) and, with data, ``alive_counts`` (latents that fired)."""
    names = GRADED_CATEGORIES if graded is not None else CATEGORIES
    summary[Summary.COUNTS] = {k: int((cols[CATEGORY] == k).sum()) for k in names}
    preset = cols.get(PRESET_CATEGORY, cols[CATEGORY])
    summary[Summary.PRESET_COUNTS] = {k: int((preset == k).sum()) for k in CATEGORIES}
    if FREQ in cols:
        summary[Summary.ALIVE_COUNTS] = {
            k: int(((cols[CATEGORY] == k) & (cols[FREQ] > 0)).sum()) for k in names
        }


def _latent_scaling_runs(
    cols: dict[str, np.ndarray], spec: Any, max_latents: int | None, seed: int,
    candidates: tuple[np.ndarray, np.ndarray] = (np.empty(0, np.int64), np.empty(0, np.int64)),
    min_control: int = 0,
) -> list[tuple[np.ndarray, str]]:
    if isinstance(spec, str):
        if spec == "none":
            return []
        if spec == "all":
            return [(cols[LATENT], "chat")]
        if spec != "auto":
            raise ConfigError(
                f"latent_scaling={spec!r}: use 'auto', 'all', 'none' or an array of latents"
            )
        cats = np.asarray(cols[CATEGORY]).astype(object).copy()
        cats[np.concatenate(candidates)] = "candidate"  # never in the shared control
        n_chat = int((cats == "chat_only").sum())
        if max_latents is not None:
            n_chat = min(n_chat, max_latents)
        n_control = max(n_chat, min_control) if len(np.concatenate(candidates)) or n_chat \
            else 0
        chat, control = pick_latents(
            cats, "chat_only", n_control=n_control, max_latents=max_latents, seed=seed,
            score=cols[REL_NORM],
        )
        base, _ = pick_latents(
            cats, "base_only", max_latents=max_latents, seed=seed, score=-cols[REL_NORM]
        )
        return [(np.union1d(np.union1d(chat, control), candidates[0]), "chat"),
                (np.union1d(base, candidates[1]), "base")]
    return [(np.unique(np.asarray(spec, dtype=np.int64)), "chat")]


def _add_latent_scaling(cols: dict[str, np.ndarray], results: list, rule: Any) -> None:
    F_ = len(cols[LATENT])
    for name in (BETA_BASE_RECON, BETA_CHAT_RECON, BETA_BASE_ERR, BETA_CHAT_ERR, NU_R, NU_EPS):
        cols[name] = np.full(F_, np.nan)
    cols[LS_REF] = np.full(F_, "", dtype=object)
    cols[TRULY_EXCLUSIVE] = np.zeros(F_, dtype=bool)
    for res, ref in results:
        other = "base" if ref == "chat" else "chat"
        for name, value in res.columns((other, ref), rule).items():
            cols[name][res.latents] = value  # beta_{base,chat}_{recon,err}, nu_r, ...
        cols[LS_REF][res.latents] = ref
    cols[LS_REF] = cols[LS_REF].astype(str)
    cat = cols[CATEGORY]
    cols[TRULY_CHAT_ONLY] = (cat == "chat_only") & (cols[LS_REF] == "chat") & cols[
        TRULY_EXCLUSIVE]
    cols[TRULY_BASE_ONLY] = (cat == "base_only") & (cols[LS_REF] == "base") & cols[
        TRULY_EXCLUSIVE]


def _ls_summary(cols: dict[str, np.ndarray], rule: Any, spec: Any,
                control: np.ndarray) -> dict[str, Any]:
    rule = rule or TrulyExclusiveRule()
    cat, ref = cols[CATEGORY], cols[LS_REF]

    def med(mask: np.ndarray, name: str) -> float | None:
        vals = cols[name][mask]
        vals = vals[np.isfinite(vals)]
        return float(np.median(vals)) if vals.size else None

    return {
        "subset": spec if isinstance(spec, str) else "custom",
        "rule": rule.to_dict(),
        "n_chat_only_scaled": int(((cat == "chat_only") & (ref == "chat")).sum()),
        "n_truly_chat_only": int(cols[TRULY_CHAT_ONLY].sum()),
        "n_base_only_scaled": int(((cat == "base_only") & (ref == "base")).sum()),
        "n_truly_base_only": int(cols[TRULY_BASE_ONLY].sum()),
        "n_shared_control": int(control.sum()),
        "median_nu_r": {
            "chat_only": med((cat == "chat_only") & (ref == "chat"), NU_R),
            "shared_control": med(control, NU_R),
        },
        "median_nu_eps": {
            "chat_only": med((cat == "chat_only") & (ref == "chat"), NU_EPS),
            "shared_control": med(control, NU_EPS),
        },
    }
