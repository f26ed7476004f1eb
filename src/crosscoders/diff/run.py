"""``diff``: the whole analysis of a crosscoder over a base/chat pair, written to one folder.

    run_diff(RUN_DIR or Crosscoder, STORE or tensor [N, S, D], OUT_DIR, DiffConfig(...),
             models={"base": path, "chat": path})

Writes to ``OUT_DIR`` (file names, table columns and JSON keys: ``crosscoders.diff.schema``):

- ``latents.parquet`` / ``latents.csv`` / ``summary.json``: the latent table (one pass:
  activation statistics, Latent Scaling and example collection ride on the same read);
- ``examples.db``: top and sampled activating examples with context (SQLite);
- ``similarity.json``: CKA and SVCCA between the base and chat sites (a second pass of
  second moments, capped at ``similarity_tokens``);
- with models: ``causal.json`` (splice CE recovered / KL per source, Minder's patch test for
  chat-only, truly chat-only and a random shared control), ``lens.json`` (activation-
  difference lens through the chat model's unembedding), ``steering.json`` (optional);
- ``diff_config.json``: the config used.

With a crosscoder directory, ``summary.json`` records it (``run_dir``), so the report finds
the training run's metrics wherever the diff was written.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch

from crosscoders.configs import Config
from crosscoders.data import ActivationData, ActivationSource, Head, as_source, ordered_stop
from crosscoders.diff.categories import CategoryThresholds
from crosscoders.diff.examples import ExampleCollector, save_examples
from crosscoders.diff.graded import GradedConfig, leaning_candidates
from crosscoders.diff.latent_scaling import TrulyExclusiveRule
from crosscoders.diff.schema import (
    CATEGORY,
    MAX_ACT,
    TRULY_CHAT_ONLY,
    Files,
    Lens,
    Similarity,
    Summary,
)
from crosscoders.diff.similarity import similarity_matrix
from crosscoders.diff.table import designated_latents, latent_table, resolve_source
from crosscoders.errors import ConfigError
from crosscoders.io import ensure_dir, json_default, write_json
from crosscoders.model import Crosscoder
from crosscoders.store import ActivationStore


@dataclasses.dataclass
class DiffConfig(Config):
    """What ``diff`` computes. Sources are crosscoder source names or indices; store source
    names (``model/site``) and model names also work when a store is given."""

    base: int | str | None = None
    chat: int | str | None = None
    preset: str = "minder"
    thresholds: CategoryThresholds | None = None  # custom thresholds (override preset)
    latent_scaling: str = "auto"  # auto | all | none
    max_ls_latents: int | None = None
    rule: TrulyExclusiveRule = dataclasses.field(default_factory=TrulyExclusiveRule)
    #: the graded view: leaning categories, dead/rare latents, scores (None: preset only)
    graded: GradedConfig | None = dataclasses.field(default_factory=GradedConfig)
    #: exclusive: latents the preset does not call shared, plus the graded.max_leaning most
    #: leaning candidates per side (kept if they come out leaning) | all | none
    examples: str = "exclusive"
    n_top: int = 10
    n_samples: int = 10
    window_before: int = 16
    window_after: int = 4
    special_ids: list[int] | None = None  # None: the store's excluded/BOS/EOS/PAD ids
    max_tokens: int | None = None
    batch_size: int = 4096
    similarity_tokens: int = 200_000
    causal_contexts: int = 16
    first_n: int = 5
    #: token (e.g. "<|assistant|>") after which the patch test's "first tokens" are
    #: counted; None: the first kept positions of each context
    response_marker: str | None = None
    lens_positions: int = 5
    lens_top: int = 20
    steer_prompts: list[str] = dataclasses.field(default_factory=list)
    steer_latents: int = 3
    seed: int = 42
    device: str = "cpu"
    progress: bool = True

    def validate(self) -> None:
        if self.latent_scaling not in ("auto", "all", "none"):
            raise ConfigError(f"latent_scaling={self.latent_scaling!r}: use auto, all or none")
        if self.examples not in ("exclusive", "all", "none"):
            raise ConfigError(f"examples={self.examples!r}: use exclusive, all or none")
        for name in ("batch_size", "first_n", "lens_positions"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")


def _source_index(model: Crosscoder, store_sources: list[dict], key: int | str) -> int:
    names = model.config.names
    key = str(key)
    if key in names or key.lstrip("-").isdigit():
        return resolve_source(model, key)
    for i, s in enumerate(store_sources):
        if key == s.get("name"):
            return i
    for i, s in enumerate(store_sources):
        if key == s.get("model"):
            return i
    known = names + [str(s.get("name")) for s in store_sources]
    raise ConfigError(f"no source {key!r}; known sources: {', '.join(dict.fromkeys(known))}")


def resolve_pair(model: Crosscoder, store_sources: list[dict], base: int | str | None,
                 chat: int | str | None) -> tuple[int, int]:
    """Base and chat source indices (defaults: source 0, and the first source of another
    model at the same site, else source 1)."""
    b = 0 if base is None else _source_index(model, store_sources, base)
    if chat is not None:
        c = _source_index(model, store_sources, chat)
    elif store_sources and "model" in store_sources[b]:
        same = [i for i, s in enumerate(store_sources)
                if s.get("model") != store_sources[b]["model"]
                and s.get("site") == store_sources[b].get("site")]
        c = same[0] if same else (1 if b != 1 else 0)
    else:
        c = 1 if b != 1 else 0
    if b == c:
        raise ConfigError(f"base and chat are the same source ({b}); give --base and --chat")
    return b, c


def _special_ids(cfg: DiffConfig, manifest: dict) -> list[int] | None:
    if cfg.special_ids is not None:
        return cfg.special_ids
    tok = manifest.get("tokenizer")
    if not tok:
        return None
    ids = set(tok.get("excluded_token_ids", []))
    ids |= {tok.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")} - {None}
    return sorted(int(i) for i in ids)


def run_diff(
    crosscoder: Crosscoder | str | Path,
    data: ActivationData,
    out_dir: str | Path,
    config: DiffConfig | None = None,
    models: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Run the analysis and write it to ``out_dir``; returns the summary dict.

    ``crosscoder``: a :class:`~crosscoders.Crosscoder` or its directory. ``data``: an
    activation store (or its directory) or a tensor [N, S, D]. ``models``: model name (as
    in the store manifest) -> local path or hub id; enables causal checks and the lens.
    """
    from crosscoders.harvest.models import resolve_device

    cfg = config or DiffConfig()
    cfg = cfg.replace(device=str(resolve_device(cfg.device)))  # "auto", or CUDA missing
    out = ensure_dir(out_dir)
    cfg.save(out / Files.DIFF_CONFIG)
    model = Crosscoder.load(crosscoder) if isinstance(crosscoder, (str, Path)) else crosscoder
    model = model.to(cfg.device).eval()
    source = as_source(data)
    store = source if isinstance(source, ActivationStore) else None
    manifest = store.manifest if store is not None else {}
    store_sources = manifest.get("sources", [])
    b, c = resolve_pair(model, store_sources, cfg.base, cfg.chat)
    preset = cfg.thresholds or cfg.preset

    # 1. the latent table, with examples riding on the same pass
    weights = latent_table(model, None, base=b, chat=c, preset=preset, graded=None)
    collector, candidates = None, np.empty(0, np.int64)
    if cfg.examples != "none":
        cats = weights.df[CATEGORY].to_numpy()
        latents = None
        if cfg.examples == "exclusive":
            if cfg.graded is not None:
                w = {k: weights.df[k].to_numpy() for k in weights.df.columns}
                candidates = np.concatenate(leaning_candidates(
                    w, cfg.graded, designated_latents(model, b, c)))
            latents = np.union1d(np.flatnonzero(cats != "shared"), candidates)
        collector = ExampleCollector(model.dict_size, latents, cfg.n_top, cfg.n_samples, cfg.seed)
    data_for_pass = _limit(source, cfg.max_tokens)
    table = latent_table(
        model, data_for_pass, base=b, chat=c, preset=preset,
        special_ids=_special_ids(cfg, manifest), latent_scaling=cfg.latent_scaling,
        rule=cfg.rule, max_ls_latents=cfg.max_ls_latents, seed=cfg.seed,
        batch_size=cfg.batch_size, progress=cfg.progress,
        extra_consumers=(collector,) if collector is not None else (), graded=cfg.graded,
    )
    table.summary[Summary.DATA] = (store.describe() if store is not None
                                   else {"kind": "tensor"})
    if isinstance(crosscoder, (str, Path)):
        table.summary[Summary.RUN_DIR] = str(Path(crosscoder).resolve())
    table.save(out)
    summary = dict(table.summary)

    tokenizer, loaded = None, {}
    if models:
        loaded, tokenizer = _load_models(models, cfg.device)
    if collector is not None:
        keep = None
        if cfg.examples == "exclusive":  # a candidate keeps its examples if it is leaning
            keep = np.flatnonzero(table.df[CATEGORY].to_numpy() != "shared")
        recs = collector.finish(model, data_for_pass, cfg.window_before, cfg.window_after,
                                tokenizer, cfg.batch_size, latents=keep)
        save_examples(recs, out / Files.EXAMPLES,
                      {Summary.SOURCES: summary[Summary.SOURCES]})
        summary[Summary.EXAMPLES] = {
            "file": Files.EXAMPLES, "n": len(recs),
            "n_latents": len({r["latent"] for r in recs}),
            "collected_for": cfg.examples if cfg.examples != "exclusive" else
            "latents the preset does not call shared, and of the "
            f"{len(candidates)} most leaning candidates those that came out leaning",
        }

    # 2. holistic baselines that need only the activations
    sim_rows, sim_cols = _similarity_sources(store_sources, b, c)
    sim = similarity_matrix(source, sim_rows, sim_cols, max_tokens=cfg.similarity_tokens,
                            progress=cfg.progress)
    sim_out = {Similarity.ROWS: [_source_label(store_sources, i) for i in sim_rows],
               Similarity.COLS: [_source_label(store_sources, i) for i in sim_cols],
               Similarity.CKA: sim["cka"].tolist(), Similarity.SVCCA: sim["svcca"].tolist(),
               Similarity.N_TOKENS: ordered_stop(source, cfg.similarity_tokens)}
    write_json(out / Files.SIMILARITY, sim_out, default=json_default)
    summary[Summary.SIMILARITY] = {k: sim_out[k] for k in (Similarity.CKA, Similarity.SVCCA)}

    # 3. everything that runs the models
    if loaded and store is not None:
        summary.update(_model_checks(cfg, model, store, loaded, tokenizer, table.df, b, c, out))
    write_json(out / Files.SUMMARY, summary, default=json_default)
    return summary


def _limit(source: ActivationSource, max_tokens: int | None) -> ActivationSource:
    if max_tokens is None or ordered_stop(source, max_tokens) == source.n_tokens:
        return source
    return Head(source, max_tokens)


def _similarity_sources(store_sources: list[dict], b: int, c: int) -> tuple[list[int], list[int]]:
    if store_sources and all("model" in s for s in store_sources):
        mb, mc = store_sources[b]["model"], store_sources[c]["model"]
        return ([i for i, s in enumerate(store_sources) if s["model"] == mb],
                [i for i, s in enumerate(store_sources) if s["model"] == mc])
    return [b], [c]


def _source_label(store_sources: list[dict], i: int) -> str:
    return str(store_sources[i].get("name", i)) if i < len(store_sources) else str(i)


def _load_models(paths: dict[str, str], device: str) -> tuple[dict[str, Any], Any]:
    from crosscoders.harvest.config import ModelSpec
    from crosscoders.harvest.models import load_model, load_tokenizer

    loaded = {name: load_model(ModelSpec(path), "float32", device) for name, path in paths.items()}
    tokenizer = load_tokenizer(ModelSpec(next(iter(paths.values()))))
    return loaded, tokenizer


def _causal_inputs(store: ActivationStore, n_contexts: int) -> torch.Tensor:
    """Token ids [B, T] of up to ``n_contexts`` held-out contexts (all of one length)."""
    start = store.n_train if store.n_eval else 0
    meta = store.records(start, store.n_tokens)
    contexts = list(dict.fromkeys(int(x) for x in meta["context"]))
    seqs = [store.context_tokens(ctx) for ctx in contexts]
    if not seqs:
        raise ConfigError(
            "the store has no contexts for the causal checks; run diff without --models, or "
            "harvest a store with more tokens"
        )
    length = max(set(len(s) for s in seqs), key=lambda n: sum(len(s) == n for s in seqs))
    chosen = [s for s in seqs if len(s) == length][:n_contexts]
    return torch.as_tensor(np.stack(chosen), dtype=torch.long)


def _model_checks(cfg: DiffConfig, model: Crosscoder, store: ActivationStore, loaded: dict,
                  tokenizer: Any, df: Any, b: int, c: int, out: Path) -> dict[str, Any]:
    from crosscoders.diff.causal import (
        after_marker,
        default_keep,
        patch_test,
        sources_from_manifest,
        splice_metrics,
    )
    from crosscoders.diff.lens import activation_difference, lens_tokens
    from crosscoders.diff.steering import steer

    sources = sources_from_manifest(store.manifest["sources"])
    missing = sorted({s.model for s in sources} - set(loaded))
    if missing:
        raise ConfigError(f"--models lacks {missing}; give NAME=PATH for every model of the store")
    ids = _causal_inputs(store, cfg.causal_contexts)
    hcfg = store.manifest.get("config", {})
    keep = default_keep(ids, _special_ids(cfg, store.manifest) or [], hcfg.get("skip_first", 0))
    splice = splice_metrics(model, loaded, sources, ids, keep)
    cat = df[CATEGORY].to_numpy()
    chat_only = np.flatnonzero(cat == "chat_only")
    truly = np.flatnonzero(df[TRULY_CHAT_ONLY].to_numpy()) if TRULY_CHAT_ONLY in df else []
    rng = np.random.default_rng(cfg.seed)
    shared = np.flatnonzero(cat == "shared")
    control = rng.choice(shared, size=min(len(chat_only), len(shared)), replace=False)
    sets = {"chat_only": chat_only, "truly_chat_only": truly, "shared_control": control}
    first = None
    if cfg.response_marker is not None:
        marker = tokenizer.convert_tokens_to_ids(cfg.response_marker)
        if marker is None or marker == tokenizer.unk_token_id:
            raise ConfigError(
                f"response_marker {cfg.response_marker!r} is not a token of the models' "
                "tokenizer; give the exact token that starts a response, e.g. <|assistant|>"
            )
        first = after_marker(ids, marker, cfg.first_n)
    patch = patch_test(model, loaded, sources, ids, sets, b, c, keep, cfg.first_n, first)
    first_desc = {"n": cfg.first_n, "after": cfg.response_marker or "start of context"}
    if first is not None:
        first_desc["n_positions"] = int((first & keep).sum())
    causal = {"n_contexts": int(len(ids)), "context_length": int(ids.shape[1]),
              "splice": {_source_label(store.manifest["sources"], s): v
                         for s, v in splice.items()},
              "patch_test": patch, "first_tokens": first_desc}
    write_json(out / Files.CAUSAL, causal, default=json_default)
    chat_model = loaded[sources[c].model]
    diff = activation_difference(store, b, c, cfg.lens_positions, progress=cfg.progress)
    lens = {Lens.N_POSITIONS: cfg.lens_positions,
            Lens.COUNT_PER_POSITION: diff["count_P"].tolist(),
            Lens.NORM: float(diff["delta_D"].norm()),
            **lens_tokens(diff["delta_D"], chat_model, tokenizer, cfg.lens_top)}
    write_json(out / Files.LENS, lens, default=json_default)
    result = {Summary.CAUSAL: causal,
              Summary.LENS: {k: lens[k] for k in (Lens.NORM, Lens.PROMOTED)}}
    if cfg.steer_prompts:
        pick = truly if len(truly) else chat_only
        pick = sorted(pick, key=lambda i: -df[MAX_ACT].to_numpy()[i])[: cfg.steer_latents]
        records = []
        for latent in pick:
            scale = float(df[MAX_ACT].to_numpy()[latent])
            records += steer(chat_model, tokenizer, model, int(latent), c, sources[c],
                             cfg.steer_prompts, scales=[0.0, scale, 2 * scale])
        write_json(out / Files.STEERING, records, default=json_default)
        result[Summary.STEERING] = {"file": Files.STEERING,
                                    "latents": [int(i) for i in pick]}
    return result
