"""Throughput of the data path: the store's shuffled reader against a sequential read of the
same bytes, and ``train()`` on a store against the bare training step.

    python benchmarks/data_path.py [--dir DIR] [--mb 256] [--batch 4096]

Builds (or reuses, under ``--dir``) one bf16 store of about ``--mb`` MiB per d_model (512 and
2304, two sources), reads every file once so that every timing below reads from the page
cache (the disk is not measured), then prints per store:
- sequential: one pass of ``np.memmap`` slices copied into a preallocated buffer (GB/s of
  stored bytes), the ceiling of any reader of these bytes on this machine;
- shuffled: the best of three epochs (after a first, untimed one) of
  ``ActivationStore.batches`` (float32 batches, as the trainer gets them) with 1, 2 and all
  cores (torch threads and reader threads), in tokens/s and GB/s of
  stored bytes, and its ratio to sequential;
and, for a small config, the tokens/s of ``train()`` on the D=512 store against the
trainer's bare step on a batch already in memory (per-step time from the difference of two
run lengths, so set-up is not counted). All numbers come from the same run.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from crosscoders import Crosscoder, CrosscoderConfig, TrainConfig, train
from crosscoders.store import ActivationStore, ShardMeta, StoreWriter
from crosscoders.store import format as fmt
from crosscoders.train import Trainer

S = 2  # sources
T = 128  # context length of the synthetic rows
SHARD_ROWS = 8192


def _meta(n: int, row0: int) -> ShardMeta:
    rows = np.zeros(n, fmt.ROW_DTYPE)
    index = np.arange(row0, row0 + n)
    rows["token"] = index % 1000
    rows["context"] = index // T
    rows["position"] = index % T
    rows["doc"] = index // T
    seq0, seq1 = row0 // T, (row0 + n - 1) // T + 1
    contexts = (np.arange(seq0 * T, seq1 * T) % 1000).reshape(-1, T).astype(np.int32)
    return ShardMeta(rows, contexts, seq0, seq1, {"bos": 1})


def build_store(path: Path, d_model: int, n_rows: int) -> ActivationStore:
    """A bf16 store of ``n_rows`` Gaussian rows [S, d_model], in shards of SHARD_ROWS."""
    if (path / fmt.MANIFEST).exists():
        return ActivationStore.open(path, verify="none")
    writer = StoreWriter(path, {"bench": d_model}, n_sources=S, d_model=d_model,
                         dtype="bfloat16")
    gen = torch.Generator().manual_seed(0)
    row, k = 0, 0
    while row < n_rows:
        n = min(SHARD_ROWS, n_rows - row)
        acts = {s: fmt.to_storage(torch.randn(n, d_model, generator=gen), "bfloat16")
                for s in range(S)}
        writer.commit(k, "m", acts, _meta(n, row))
        row, k = row + n, k + 1
    writer.end(k, row)
    writer.finalize({"sources": [{"name": f"src{s}"} for s in range(S)], "eval_tokens": 0})
    return ActivationStore.open(path, verify="none")


def _acts_files(store: ActivationStore) -> list[Path]:
    return [fmt.shard_dir(store.root, int(sh["index"])) / fmt.acts_name(s)
            for sh in store.shards for s in range(S)]


def warm_page_cache(store: ActivationStore) -> None:
    for path in _acts_files(store):
        with open(path, "rb") as handle:
            while handle.read(64 << 20):
                pass


def sequential_gbps(store: ActivationStore) -> float:
    """GB/s of one pass over the activation bytes through memmap slices (best of 3)."""
    buf = np.empty(64 << 20, np.uint8)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        total = 0
        for path in _acts_files(store):
            data = np.load(path, mmap_mode="r").reshape(-1).view(np.uint8)
            for a in range(0, data.size, buf.size):
                part = data[a : a + buf.size]
                np.copyto(buf[: part.size], part)
                total += part.size
        best = min(best, time.perf_counter() - start)
    return total / best / 1e9


def shuffled(store: ActivationStore, batch: int, threads: int) -> tuple[float, float]:
    """(tokens/s, GB/s of stored bytes) of the fastest of three epochs of shuffled batches
    (the machine is shared: the best epoch is the reader's, the others include neighbours)."""
    torch.set_num_threads(threads)
    store.read_threads = threads
    n_batches = store.n_train // batch
    batches = store.batches(batch, seed=0)
    for _ in range(n_batches):  # one epoch first: the reader's buffers are faulted in, as
        next(batches)  # in a run of many epochs (the first touch of fresh pages is slow here)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(n_batches):
            next(batches)
        best = min(best, time.perf_counter() - start)
    batches.close()
    tokens = n_batches * batch
    return tokens / best, tokens * store.row_bytes / best / 1e9


def train_vs_step(store: ActivationStore, threads: int) -> dict[str, float]:
    """tokens/s of train() on the store vs the bare step (small config, CPU)."""
    torch.set_num_threads(threads)
    store.read_threads = threads
    B, F, k = 1024, 4096, 32
    cfg = CrosscoderConfig(n_sources=S, d_model=store.d_model, dict_size=F, k=k)

    def run(steps: int) -> float:
        tc = TrainConfig(steps=steps, batch_size=B, progress=False, eval_tokens=0,
                         norm_sample_tokens=B, log_every=10**6, eval_every=10**6,
                         device="cpu")
        start = time.perf_counter()
        train(cfg, store, tc)
        return time.perf_counter() - start

    run(2)  # warm-up
    short, long = run(5), run(45)
    train_s = (long - short) / 40
    tc = TrainConfig(steps=10**6, batch_size=B, progress=False, eval_tokens=0,
                     norm_sample_tokens=B, device="cpu")
    trainer = Trainer(Crosscoder(cfg), store, tc)
    trainer.init_from_data()
    x_BSD = next(store.batches(B, seed=0))
    trainer.train_step(x_BSD)
    start = time.perf_counter()
    for _ in range(20):
        trainer.train_step(x_BSD)
    step_s = (time.perf_counter() - start) / 20
    return {"train_tok_s": B / train_s, "step_tok_s": B / step_s, "ratio": step_s / train_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", type=Path, default=None, help="where to build the stores")
    parser.add_argument("--mb", type=int, default=256, help="MiB of activations per store")
    parser.add_argument("--batch", type=int, default=4096)
    args = parser.parse_args()
    root = args.dir or Path(tempfile.mkdtemp(prefix="crosscoders-bench-"))
    cores = os.cpu_count() or 1
    print(f"machine: {cores} cores, torch {torch.__version__}; reads from the page cache")
    stores = {}
    for d_model in (512, 2304):
        n_rows = (args.mb << 20) // (S * d_model * 2) // SHARD_ROWS * SHARD_ROWS or SHARD_ROWS
        store = build_store(root / f"d{d_model}", d_model, n_rows)
        store.verify_reads = False  # hashing is a once-per-shard cost, not the read path's
        warm_page_cache(store)
        stores[d_model] = store
        seq = sequential_gbps(store)
        print(f"D={d_model}: {store.n_tokens} tokens x {store.row_bytes} B "
              f"({store.n_tokens * store.row_bytes / 1e9:.2f} GB), sequential {seq:.2f} GB/s")
        for threads in sorted({1, 2, cores}):
            tok_s, gbps = shuffled(store, args.batch, threads)
            print(f"  shuffled, {threads} core(s): {tok_s / 1e6:.2f} M tokens/s, "
                  f"{gbps:.2f} GB/s = {gbps / seq:.2f}x sequential")
    r = train_vs_step(stores[512], cores)
    print(f"train() on D=512 (S={S}, F=4096, k=32, B=1024, {cores} cores): "
          f"{r['train_tok_s']:.0f} tokens/s vs bare step {r['step_tok_s']:.0f} tokens/s "
          f"= {r['ratio']:.2f}x")


if __name__ == "__main__":
    main()
