"""The harvest: run the models on the token stream and write their activations to a store.

What runs where (so that the accelerator stays busy): a thread tokenises the next batches;
the main thread launches the forward passes, converts the activations to the store dtype,
sums the statistics on the model's device (an accelerator; on CPU the write threads do),
and starts asynchronous copies of the stored bytes into reused (pinned, on CUDA) host
buffers; a pool of write threads waits for those copies, then writes, hashes and fsyncs each
shard's files (one thread per file); one commit thread records the shards in order.
"""

from __future__ import annotations

import gc
import hashlib
import json
import queue
import threading
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

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
from crosscoders.store.writer import BackgroundCommits, Parts, ShardMeta, StoreWriter

# Shards committed behind the forward passes (each holds one host buffer): up to WRITE_AHEAD
# wait to be recorded while their files are written. 0 commits every shard on the main
# thread before the next forward (the reference path the tests compare to).
WRITE_AHEAD = 2
# Token batches prepared ahead by the tokenising thread; 0 tokenises on the main thread.
PREFETCH_BATCHES = 4
# Where the statistics are summed. None: on the model's device when it is an accelerator
# (idle otherwise); on CPU the write threads sum them from the stored arrays instead, off the
# thread that runs the forward. True forces the device path (tests run it on CPU).
STATS_ON_DEVICE: bool | None = None
_STATS_ELEMENTS = 1 << 24  # float64 elements summed at a time on the device

T = TypeVar("T")


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
        """[B, L] ids and flat indices of kept positions -> {source: [n_kept, D]} on the
        model's device (nothing here waits for the device)."""
        outputs = self.reader(to_device(input_ids, self.device))
        keep_flat = to_device(keep_flat, self.device)
        out = {}
        for source, hidden in zip(self.sources, outputs, strict=True):
            if hidden.shape[-1] != self.d_model:
                raise DataError(
                    f"{source.name} produced d_model {hidden.shape[-1]}, expected {self.d_model}; "
                    "please report this architecture"
                )
            out[source.index] = hidden.reshape(-1, hidden.shape[-1])[keep_flat]
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


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device``; to CUDA through pinned memory, so the copy is queued
    behind the running kernels instead of waiting for them."""
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


class _HostShard:
    """Host memory that receives one shard: each source's rows in the store dtype and its
    [D + 1] float64 statistics. Pinned when the models run on CUDA, so the device-to-host
    copies are asynchronous; reused from shard to shard."""

    def __init__(
        self, sources: list[int], capacity: int, d_model: int, dtype: str, pin: bool
    ) -> None:
        store = fmt.torch_dtype(dtype)
        self.acts = {
            s: torch.empty(capacity, d_model, dtype=store, pin_memory=pin) for s in sources
        }
        self.stats = {s: torch.empty(d_model + 1, dtype=torch.float64, pin_memory=pin)
                      for s in sources}
        self.copied: list[torch.cuda.Event] = []  # recorded after the shard's last copies

    def release(self) -> None:
        """Drop the buffers (once nothing reads or copies into them any more)."""
        self.acts, self.stats, self.copied = {}, {}, []

    def wait(self) -> None:
        """Block until the copies into this buffer are done (before reading it)."""
        for event in self.copied:
            event.synchronize()

    def arrays(
        self, sources: list[int], n: int, with_stats: bool
    ) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray] | None]:
        """The first ``n`` rows and (``with_stats``) the statistics of ``sources``, as numpy
        views."""
        acts = {s: fmt.storage_numpy(self.acts[s][:n]) for s in sources}
        return acts, {s: self.stats[s].numpy() for s in sources} if with_stats else None


class _Shard:
    """The shard being filled: row metadata on the host; each batch's activations converted
    to the store dtype on the model's device, summed there in float64 (``stats_on_device``)
    and copied into ``host`` without waiting."""

    def __init__(self, seq_start: int, host: _HostShard, dtype: str, stats_on_device: bool):
        self.seq_start = seq_start
        self.seq_end = 0
        self.host = host
        self.store = fmt.torch_dtype(dtype)
        self.stats_on_device = stats_on_device
        self.rows: list[np.ndarray] = []
        self.contexts: list[np.ndarray] = []
        self.masked: dict[str, int] = {}
        self.n = 0
        self.sums: dict[int, torch.Tensor] = {}  # [D] float64: sum of the stored x
        self.squares: dict[int, torch.Tensor] = {}  # [D] float64: column sums of x^2
        self.devices: set[torch.device] = set()

    def add(self, source: int, acts_ND: torch.Tensor) -> None:
        """Store one batch's kept rows of ``source`` at rows ``[n, n + len)`` of the shard."""
        rows = self.host.acts[source][self.n : self.n + acts_ND.shape[0]]
        self.devices.add(acts_ND.device)
        if not self.stats_on_device:
            rows.copy_(acts_ND, non_blocking=True)  # converts to the store dtype as it copies
            return
        stored_ND = acts_ND.to(self.store)
        n, d = stored_ND.shape
        if source not in self.sums:
            self.sums[source] = torch.zeros(d, dtype=torch.float64, device=stored_ND.device)
            self.squares[source] = torch.zeros_like(self.sums[source])
        step = max(1, _STATS_ELEMENTS // d)  # bounds the float64 temporaries
        for start in range(0, n, step):
            x_ND = stored_ND[start : start + step].double()
            self.sums[source] += x_ND.sum(0)
            self.squares[source] += (x_ND * x_ND).sum(0)
        rows.copy_(stored_ND, non_blocking=True)  # async into pinned memory on CUDA

    def finish(self) -> ShardMeta:
        """Queue the statistics' copies and mark the end of the shard's copies."""
        for source, sums in self.sums.items():
            stats = torch.cat([sums, self.squares[source].sum().view(1)])
            self.host.stats[source].copy_(stats, non_blocking=True)
        self.host.copied = []
        for device in self.devices:
            if device.type == "cuda":
                event = torch.cuda.Event(blocking=True)  # the waiting thread sleeps
                event.record(torch.cuda.current_stream(device))
                self.host.copied.append(event)
        return ShardMeta(
            rows=np.concatenate(self.rows) if self.rows else np.empty(0, fmt.ROW_DTYPE),
            contexts=np.concatenate(self.contexts),
            seq_start=self.seq_start,
            seq_end=self.seq_end,
            masked=self.masked,
        )


def _prefetch(items: Iterable[T], depth: int) -> Iterator[T]:
    """Iterate ``items`` on a background thread, up to ``depth`` items ahead; its errors are
    raised here. Closing this generator stops the thread."""
    if depth <= 0:
        yield from items
        return
    ready: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(kind: str, value: Any) -> bool:
        while not stop.is_set():
            try:
                ready.put((kind, value), timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put("item", item):
                    break
            else:
                put("end", None)
        except BaseException as err:  # noqa: BLE001 - raised again in the consumer
            put("error", err)
        finally:
            close = getattr(items, "close", None)
            if close is not None:  # a generator stopped early: release its files now
                close()

    thread = threading.Thread(target=produce, name="crosscoders-tokens", daemon=True)
    thread.start()
    try:
        while True:
            kind, value = ready.get()
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()
        thread.join()


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
    group_of = dict(zip(runners, groups, strict=True))
    done = {m: writer.done(g) for m, g in group_of.items()}  # as of the start of the pass
    first = min(done.values())
    shard = first
    rows_before = writer.rows_before(first)
    bar.update(rows_before)
    sources = {m: [s.index for s in runner.sources] for m, runner in runners.items()}
    d_model = next(iter(runners.values())).d_model
    pin = any(runner.device.type == "cuda" for runner in runners.values())
    on_device = STATS_ON_DEVICE
    if on_device is None:
        on_device = any(runner.device.type != "cpu" for runner in runners.values())
    # A shard closes once it holds shard_tokens rows, so it ends within one batch of that.
    capacity = min(config.shard_tokens - 1 + config.batch_size * config.context_length,
                   config.tokens)
    # Host buffers are used in turn. When the main thread starts filling one, at most
    # WRITE_AHEAD shards wait in the commit queue and one is being recorded (each one after
    # its files are written), so the buffer WRITE_AHEAD + 2 shards back is free.
    n_hosts = WRITE_AHEAD + 2 if WRITE_AHEAD > 0 else 1
    hosts: list[_HostShard] = []
    known = writer.n_shards_known  # shards whose row files an earlier pass or run wrote

    def new_shard(seq_start: int) -> _Shard:
        slot = (shard - first) % n_hosts
        if slot == len(hosts):
            every = [s for m in runners for s in sources[m]]
            hosts.append(_HostShard(every, capacity, d_model, config.store_dtype, pin))
        return _Shard(seq_start, hosts[slot], config.store_dtype, on_device)

    buf = new_shard(writer.seq_start(first))
    commits = BackgroundCommits(WRITE_AHEAD) if WRITE_AHEAD > 0 else None

    def flush() -> None:
        nonlocal shard, rows_before, buf
        meta = buf.finish()
        todo = {group_of[m]: sources[m] for m in runners if done[m] <= shard}
        write = partial(_write_shard, writer, shard, buf.host, todo, meta, shard >= known,
                        on_device)
        record = partial(_record_shard, writer, shard, meta)
        if commits is None:
            record(write())
        else:
            commits.submit(write, record)
        rows_before += buf.n
        shard += 1
        buf = new_shard(buf.seq_end)

    wanted = rows_before < config.tokens
    batches = _prefetch(stream.batches(skip_contexts=buf.seq_start) if wanted else [],
                        PREFETCH_BATCHES)
    try:
        for batch in batches:
            flat, masked = kept_positions(batch, config.tokens - rows_before - buf.n)
            flat_t = torch.from_numpy(flat)
            ids = torch.from_numpy(batch.input_ids)
            for m, runner in runners.items():
                if done[m] > shard or not flat.size:
                    continue  # nothing to store, or this model wrote the shard in an earlier run
                for source, acts in runner.run(ids, flat_t).items():
                    buf.add(source, acts)
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
        if commits is not None:
            commits.close()  # every shard written and recorded; raises a commit's error
    finally:
        batches.close()
        if commits is not None:
            commits.stop()
        for host in hosts:
            host.release()
        if pin:
            _release_pinned()
    writer.end(shard, rows_before)


def _write_shard(
    writer: StoreWriter,
    index: int,
    host: _HostShard,
    groups: dict[str, list[int]],
    meta: ShardMeta,
    with_meta: bool,
    with_stats: bool,
) -> tuple[Parts, dict[str, Any]]:
    """Write shard ``index``'s files for ``groups`` ({group: its sources}) from ``host``,
    once the copies into it are done (on a pool thread); ``with_stats``: ``host`` holds the
    statistics, else they are summed here from the stored arrays."""
    host.wait()
    n = len(meta.rows)
    parts: Parts = {g: host.arrays(sources, n, with_stats) for g, sources in groups.items()}
    return parts, writer.write_shard(index, parts, meta, with_meta)


def _record_shard(
    writer: StoreWriter, index: int, meta: ShardMeta, written: tuple[Parts, dict[str, Any]]
) -> None:
    """Record the written shard in ``progress.json`` (shards in order, on one thread)."""
    parts, files = written
    writer.commit_shard(index, parts, meta, files)


def _release_pinned() -> None:
    """Give PyTorch's cached pinned host memory (the shard buffers) back to the system."""
    empty = getattr(getattr(torch, "accelerator", None), "empty_host_cache", None)
    if empty is not None:
        empty()
