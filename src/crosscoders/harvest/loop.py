"""The harvest: run the models on the token stream and write their activations to a store."""

from __future__ import annotations

import gc
import hashlib
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from crosscoders.errors import ConfigError, DataError
from crosscoders.harvest.capture import SiteReader
from crosscoders.harvest.config import HarvestConfig
from crosscoders.harvest.models import (
    compare_tokenizers,
    find_blocks,
    fingerprint,
    load_config,
    load_model,
    load_tokenizer,
    n_layers_and_d_model,
    resolve_device,
)
from crosscoders.harvest.sites import Site, resolve_site
from crosscoders.harvest.tokens import KEEP, REASONS, ContextBatch, TokenStream, pick_chat_tokenizer
from crosscoders.store import format as fmt
from crosscoders.store.reader import ActivationStore
from crosscoders.store.writer import ShardMeta, StoreWriter


@dataclass(frozen=True)
class SourcePlan:
    """One source of the store: a site of one model."""

    index: int  # position in the store's S axis
    model: int  # index into config.models
    model_name: str
    site: Site
    d_model: int

    @property
    def name(self) -> str:
        return f"{self.model_name}/{self.site.name}"


@dataclass
class HarvestPlan:
    """What a harvest will do, worked out from the configs alone (no weights loaded)."""

    config: HarvestConfig
    sources: list[SourcePlan]
    fingerprints: list[dict[str, Any]]

    @property
    def d_model(self) -> int:
        return self.sources[0].d_model

    def sources_of(self, model: int) -> list[SourcePlan]:
        return [s for s in self.sources if s.model == model]

    def identity(self) -> dict[str, Any]:
        return {"config": self.config.identity(), "models": self.fingerprints}


def plan_harvest(config: HarvestConfig) -> HarvestPlan:
    """Resolve every site and check the sources share one d_model (before loading weights)."""
    names = config.model_names()
    sources: list[SourcePlan] = []
    fingerprints = []
    for m, spec in enumerate(config.models):
        model_config = load_config(spec)
        n_layers, d_model = n_layers_and_d_model(model_config)
        seen: dict[Site, str] = {}
        for text in spec.sites:
            site = resolve_site(text, n_layers, names[m])
            if site in seen:
                raise ConfigError(
                    f"model {names[m]}: sites {seen[site]!r} and {text!r} are both {site.name}; "
                    "list each site once"
                )
            seen[site] = text
            sources.append(SourcePlan(len(sources), m, names[m], site, d_model))
        fingerprints.append({"name": names[m], **fingerprint(spec, model_config)})
    if len({s.d_model for s in sources}) > 1:
        sizes = ", ".join(f"{s.name}: {s.d_model}" for s in sources)
        raise ConfigError(
            f"sources have different d_model ({sizes}); the crosscoder needs one d_model for all "
            "sources: pair models or sites with the same hidden size"
        )
    return HarvestPlan(config, sources, fingerprints)


def load_tokenizers(config: HarvestConfig) -> list[Any]:
    """Every model's tokenizer, checked to agree with the first one."""
    names = config.model_names()
    tokenizers = [load_tokenizer(spec) for spec in config.models]
    for name, tok in zip(names[1:], tokenizers[1:], strict=True):
        compare_tokenizers(tokenizers[0], tok, names[0], name)
    return tokenizers


class ModelRunner:
    """One loaded model and its sites: token batch -> activations of the kept positions."""

    def __init__(self, plan: HarvestPlan, model_index: int) -> None:
        config = plan.config
        self.sources = plan.sources_of(model_index)
        self.device = resolve_device(config.device)
        self.model = load_model(config.models[model_index], config.dtype, config.device)
        _, blocks = find_blocks(self.model)
        n_layers = n_layers_and_d_model(self.model.config)[0]
        if len(blocks) != n_layers:
            raise ConfigError(
                f"model {self.sources[0].model_name}: found {len(blocks)} decoder blocks "
                f"but its config says {n_layers}; please report this architecture"
            )
        self.reader = SiteReader(self.model, blocks, [s.site for s in self.sources])
        self.d_model = plan.d_model

    def run(self, input_ids: torch.Tensor, keep_flat: torch.Tensor) -> dict[int, torch.Tensor]:
        """[B, L] ids and flat indices of kept positions -> {source: [n_kept, D]}."""
        outputs = self.reader(input_ids.to(self.device))
        out = {}
        for source, hidden in zip(self.sources, outputs, strict=True):
            if hidden.shape[-1] != self.d_model:
                raise DataError(
                    f"{source.name} produced d_model {hidden.shape[-1]}, expected {self.d_model}; "
                    "please report this architecture"
                )
            out[source.index] = hidden.reshape(-1, hidden.shape[-1])[keep_flat.to(hidden.device)]
        return out

    def close(self, collect: bool = False) -> None:
        """Drop the model; ``collect`` frees its memory now (before loading the next one)."""
        del self.model, self.reader
        if collect:
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


def kept_positions(batch: ContextBatch, limit: int) -> tuple[np.ndarray, dict[str, int]]:
    """Flat indices (row-major over [B, L]) of at most ``limit`` stored positions, and the
    count of excluded positions per reason up to the last one taken."""
    flat = np.flatnonzero(batch.reason.reshape(-1) == KEEP)
    reasons = batch.reason.reshape(-1)
    if flat.size > limit:
        flat = flat[:limit]
        reasons = reasons[: int(flat[-1]) + 1] if limit else reasons[:0]
    counts = np.bincount(reasons, minlength=len(REASONS) + 1)
    return flat, {name: int(counts[code]) for code, name in REASONS.items()}


def batch_rows(batch: ContextBatch, flat: np.ndarray) -> np.ndarray:
    """Row metadata (fmt.ROW_DTYPE) of the kept flat positions."""
    width = batch.input_ids.shape[1]
    ctx, pos = np.divmod(flat, width)
    rows = np.empty(flat.size, dtype=fmt.ROW_DTYPE)
    rows["token"] = batch.input_ids.reshape(-1)[flat]
    rows["context"] = batch.seq_start + ctx
    rows["position"] = pos
    rows["doc"] = batch.doc.reshape(-1)[flat]
    rows["doc_pos"] = batch.doc_pos.reshape(-1)[flat]
    rows["dataset"] = batch.dataset.reshape(-1)[flat]
    return rows


def batch_contexts(batch: ContextBatch, width: int) -> np.ndarray:
    """[B, width] int32 token ids of the batch's contexts, -1 past each one's end."""
    out = np.full((batch.n_contexts, width), -1, dtype=np.int32)
    for i, n in enumerate(batch.length):
        out[i, :n] = batch.input_ids[i, :n]
    return out


@dataclass
class _ShardBuffer:
    seq_start: int
    seq_end: int = 0
    acts: dict[int, list[np.ndarray]] = field(default_factory=dict)
    rows: list[np.ndarray] = field(default_factory=list)
    contexts: list[np.ndarray] = field(default_factory=list)
    masked: dict[str, int] = field(default_factory=dict)
    n: int = 0

    def meta(self) -> ShardMeta:
        return ShardMeta(
            rows=np.concatenate(self.rows) if self.rows else np.empty(0, fmt.ROW_DTYPE),
            contexts=np.concatenate(self.contexts),
            seq_start=self.seq_start,
            seq_end=self.seq_end,
            masked=self.masked,
        )


def _tokenizer_info(tokenizer: Any, stream: TokenStream) -> dict[str, Any]:
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return {
        "name_or_path": getattr(tokenizer, "name_or_path", ""),
        "vocab_size": len(vocab),
        "vocab_sha256": hashlib.sha256(json.dumps(vocab).encode()).hexdigest(),
        "bos_token_id": stream.bos_id,
        "eos_token_id": stream.eos_id,
        "pad_token_id": stream.pad_id,
        "excluded_token_ids": stream.excluded_ids.tolist(),
    }


def harvest(config: HarvestConfig, out_dir: str | Path, progress: bool = True) -> ActivationStore:
    """Harvest activations of ``config.models`` at their sites into a store at ``out_dir``.

    Resumable: run it again with the same config after a crash and it continues after the
    last complete shard; on a complete store it returns at once.
    """
    from tqdm.auto import tqdm

    out = Path(out_dir)
    plan = plan_harvest(config)
    names = config.model_names()
    writer = StoreWriter(
        out,
        plan.identity(),
        n_sources=len(plan.sources),
        d_model=plan.d_model,
        dtype=config.store_dtype,
    )
    if writer.complete:
        return ActivationStore.open(out)
    tokenizers = load_tokenizers(config)
    stream = TokenStream(config, tokenizers[0], pick_chat_tokenizer(config, tokenizers))
    if not (out / fmt.CONFIG).exists():
        config.save(out / fmt.CONFIG)
    passes = [[m] for m in range(len(names))] if config.sequential else [list(range(len(names)))]
    for members in passes:
        ended = writer.ended
        todo = [m for m in members if ended is None or writer.done(names[m]) < ended["n_shards"]]
        if not todo:
            continue
        runners = {m: ModelRunner(plan, m) for m in todo}
        try:
            label = "+".join(names[m] for m in todo)
            with tqdm(
                total=config.tokens,
                unit="tok",
                unit_scale=True,
                desc=f"harvest {label}",
                disable=not progress,
            ) as bar:
                _run_pass(config, writer, stream, runners, [names[m] for m in todo], bar)
        finally:
            for runner in runners.values():
                runner.close(collect=config.sequential)
    ended = writer.ended
    assert ended is not None
    if ended["n_tokens"] == 0:
        raise DataError(
            "no tokens to store: the data is empty or every position was masked "
            "(check skip_first, exclude_tokens and the data files)"
        )
    if ended["n_tokens"] < config.tokens:
        warnings.warn(
            f"the data ran out after {ended['n_tokens']} tokens of the {config.tokens} asked for",
            stacklevel=2,
        )
    writer.finalize(
        {
            "sources": [
                {
                    "name": s.name,
                    "model": s.model_name,
                    "path": config.models[s.model].path,
                    "site": s.site.name,
                    "kind": s.site.kind,
                    "layer": s.site.layer,
                    "d_model": s.d_model,
                }
                for s in plan.sources
            ],
            "models": plan.fingerprints,
            "eval_tokens": config.eval_tokens,
            "context_length": config.context_length,
            "bos": stream.bos,
            "datasets": [d.path for d in config.data],
            "tokenizer": _tokenizer_info(tokenizers[0], stream),
            "config": config.to_dict(),
        }
    )
    return ActivationStore.open(out)


def _run_pass(
    config: HarvestConfig,
    writer: StoreWriter,
    stream: TokenStream,
    runners: dict[int, ModelRunner],
    groups: list[str],
    bar: Any,
) -> None:
    """One pass over the token stream, computing the shards the given models still lack."""
    first = min(writer.done(g) for g in groups)
    shard = first
    rows_before = writer.rows_before(first)
    bar.update(rows_before)
    buf = _ShardBuffer(seq_start=writer.seq_start(first))
    group_of = dict(zip(runners, groups, strict=True))

    def flush() -> None:
        nonlocal shard, rows_before, buf
        meta = buf.meta()
        for m, runner in runners.items():
            if writer.done(group_of[m]) == shard:
                acts = {s.index: np.concatenate(buf.acts[s.index]) for s in runner.sources}
                writer.commit(shard, group_of[m], acts, meta)
        rows_before += buf.n
        shard += 1
        buf = _ShardBuffer(seq_start=buf.seq_end)

    batches = stream.batches(skip_contexts=buf.seq_start) if rows_before < config.tokens else []
    for batch in batches:
        flat, masked = kept_positions(batch, config.tokens - rows_before - buf.n)
        flat_t = torch.from_numpy(flat)
        ids = torch.from_numpy(batch.input_ids)
        for m, runner in runners.items():
            if writer.done(group_of[m]) > shard:
                continue  # this model already wrote this shard (e.g. in an earlier run)
            if flat.size:
                for source, acts in runner.run(ids, flat_t).items():
                    buf.acts.setdefault(source, []).append(fmt.to_storage(acts, config.store_dtype))
            else:
                for s in runner.sources:
                    buf.acts.setdefault(s.index, [])
        buf.rows.append(batch_rows(batch, flat))
        buf.contexts.append(batch_contexts(batch, config.context_length))
        buf.seq_end = batch.seq_start + batch.n_contexts
        for key, value in masked.items():
            buf.masked[key] = buf.masked.get(key, 0) + value
        buf.n += flat.size
        bar.update(flat.size)
        if buf.n and (buf.n >= config.shard_tokens or rows_before + buf.n >= config.tokens):
            flush()
        if rows_before >= config.tokens:
            break
    if buf.n:
        flush()
    writer.end(shard, rows_before)
