"""Harvest and store benchmark on tiny random-init models sized like the workshop ones.

    python benchmarks/harvest.py [--tokens 32768] [--layers 6] [--d-model 512]
                                 [--device cuda --dtype bfloat16 --no-rss] [--compare-sync]

Prints, in one run: harvest throughput vs a bare forward truncated at the needed block,
the early-stop speedup over a full forward, store read throughput vs a plain sequential
read of the same bytes, and the peak RSS of a harvest for two token counts.
``--compare-sync`` also times the same harvest with everything on the main thread (no
tokenising thread, each shard committed before the next forward). ``--profile`` profiles
the main thread only (the thread that launches the forward passes).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from crosscoders.harvest import DataSpec, HarvestConfig, ModelSpec, harvest
from crosscoders.harvest.capture import SiteReader
from crosscoders.harvest.models import find_blocks
from crosscoders.harvest.sites import resolve_site
from crosscoders.harvest.tokens import TokenStream
from crosscoders.testing import make_model, make_tokenizer, write_text_corpus


def _config(root: Path, tokens: int, args: argparse.Namespace) -> HarvestConfig:
    return HarvestConfig(
        models=[
            ModelSpec(str(root / "base"), sites=[args.site], name="base"),
            ModelSpec(str(root / "chat"), sites=[args.site], name="chat"),
        ],
        data=[DataSpec(str(root / "text.jsonl"))],
        tokens=tokens,
        context_length=args.context,
        batch_size=args.batch,
        device=args.device,
        dtype=args.dtype,
        store_dtype="bfloat16",
        shard_tokens=8192,
        eval_tokens=0,
    )


def _bare_truncated(root: Path, cfg: HarvestConfig, n_layers: int) -> float:
    """Seconds for both models' bare forwards (blocks 0..L only, no lm_head) on the same batches."""
    from transformers import AutoModelForCausalLM

    stream = TokenStream(cfg, make_tokenizer())
    batches = []
    total = 0
    for batch in stream.batches():
        batches.append(torch.from_numpy(batch.input_ids))
        total += int((batch.reason == 0).sum())
        if total >= cfg.tokens:
            break
    keep = resolve_site(cfg.models[0].sites[0], n_layers).layer + 1
    models = []
    for name in ("base", "chat"):
        model = AutoModelForCausalLM.from_pretrained(
            root / name, num_hidden_layers=keep, dtype=getattr(torch, cfg.dtype))
        models.append(model.model.to(cfg.device).eval())  # the decoder stack, no lm_head
    _sync(cfg.device)
    start = time.perf_counter()
    with torch.inference_mode():
        for ids in batches:
            ids = ids.to(cfg.device)
            for model in models:
                model(input_ids=ids, use_cache=False)
    _sync(cfg.device)
    return time.perf_counter() - start


def _sync_harvest(root: Path, cfg: HarvestConfig) -> float:
    """Seconds for the same harvest with tokenising and commits on the main thread."""
    from crosscoders.harvest import loop

    saved = loop.WRITE_AHEAD, loop.PREFETCH_BATCHES
    loop.WRITE_AHEAD, loop.PREFETCH_BATCHES = 0, 0
    try:
        start = time.perf_counter()
        harvest(cfg, root / "store_sync", progress=False)
        return time.perf_counter() - start
    finally:
        loop.WRITE_AHEAD, loop.PREFETCH_BATCHES = saved


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _early_stop(root: Path, args: argparse.Namespace, repeats: int = 5) -> tuple[float, float]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        root / "base", dtype=getattr(torch, args.dtype)).to(args.device).eval()
    _, blocks = find_blocks(model)
    reader = SiteReader(model, blocks, [resolve_site(args.site, len(blocks))])
    ids = torch.randint(7, 100, (args.batch, args.context), device=args.device)

    def timed(fn) -> float:
        fn()
        best = float("inf")
        for _ in range(repeats):
            _sync(args.device)
            start = time.perf_counter()
            fn()
            _sync(args.device)
            best = min(best, time.perf_counter() - start)
        return best

    with torch.inference_mode():
        full = timed(lambda: model(input_ids=ids, use_cache=False))
    early = timed(lambda: reader(ids))
    return full, early


def _read(store_path: Path) -> tuple[float, float]:
    """Bytes/s of shuffled batches vs a plain sequential read of the activation files."""
    from crosscoders.store import ActivationStore

    store = ActivationStore.open(store_path)
    files = sorted(store_path.glob("shards/*/acts_*.npy"))
    start = time.perf_counter()
    n_bytes = 0
    for path in files:
        n_bytes += np.fromfile(path, dtype=np.uint8).size
    plain = n_bytes / (time.perf_counter() - start)
    batch = 4096
    n_batches = max(1, store.n_train // batch)
    it = store.batches(batch, seed=0)
    next(it)  # thread start-up and first window
    start = time.perf_counter()
    for _ in range(n_batches):
        next(it)
    ours = n_batches * batch * store.row_bytes / (time.perf_counter() - start)
    return ours, plain


def _rss_child(root: Path, tokens: int, args: argparse.Namespace) -> float:
    code = (
        "import sys, resource, json; from pathlib import Path\n"
        "from crosscoders.harvest import HarvestConfig, harvest\n"
        "harvest(HarvestConfig.load(sys.argv[1]), sys.argv[2], progress=False)\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)\n"
    )
    cfg_path = root / f"rss_{tokens}.json"
    _config(root, tokens, args).save(cfg_path)
    out = subprocess.run(
        [sys.executable, "-c", code, str(cfg_path), str(root / f"rss_{tokens}")],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return float(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--site", default="0.5")
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="the models' dtype")
    parser.add_argument("--no-rss", action="store_true", help="skip the peak-RSS children")
    parser.add_argument("--compare-sync", action="store_true",
                        help="also time the harvest with every step on the main thread")
    parser.add_argument("--profile", action="store_true",
                        help="print where the harvest call spends its time (cProfile)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp(prefix="harvest_bench_"))
    tok = make_tokenizer()
    sizes = dict(d_model=args.d_model, n_layers=args.layers, n_heads=8, d_mlp=4 * args.d_model)
    make_model(root / "base", "llama", seed=0, tokenizer=tok, **sizes)
    make_model(root / "chat", "llama", seed=1, tokenizer=tok, **sizes)
    write_text_corpus(root / "text.jsonl", max(2000, args.tokens // 20), seed=0)
    cfg = _config(root, args.tokens, args)

    # Warm-up: the first harvest in a process pays transformers' lazy imports (~2 s).
    harvest(_config(root, 512, args), root / "warmup", progress=False)
    profiler = None
    if args.profile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    start = time.perf_counter()
    store = harvest(cfg, root / "store", progress=False)
    ours = time.perf_counter() - start
    if profiler is not None:
        import pstats

        profiler.disable()
        pstats.Stats(profiler, stream=sys.stderr).sort_stats("cumulative").print_stats(35)
        pstats.Stats(profiler, stream=sys.stderr).sort_stats("tottime").print_stats(20)
    sync = _sync_harvest(root, cfg) if args.compare_sync else None
    bare = _bare_truncated(root, cfg, args.layers)
    full, early = _early_stop(root, args)
    read_ours, read_plain = _read(root / "store")
    rss = {} if args.no_rss else {n: _rss_child(root, n, args)
                                  for n in (args.tokens // 4, args.tokens)}

    results = {
        "setup": f"2 x llama {args.layers} layers d{args.d_model}, site {args.site} "
        f"(block {store.sources[0]['layer']}), context {args.context}, batch {args.batch}, "
        f"{torch.get_num_threads()} threads, store bf16, {args.device} {args.dtype}",
        "harvest_tokens_per_s": round(store.n_tokens / ours),
        "bare_truncated_tokens_per_s": round(store.n_tokens / bare),
        "harvest_vs_bare_ratio": round(bare / ours, 3),
        **({} if sync is None else {"harvest_sync_tokens_per_s": round(store.n_tokens / sync),
                                    "sync_vs_bare_ratio": round(bare / sync, 3)}),
        "early_stop_speedup_vs_full_forward": round(full / early, 3),
        "store_read_MB_per_s": round(read_ours / 1e6),
        "plain_sequential_read_MB_per_s": round(read_plain / 1e6),
        "read_ratio": round(read_ours / read_plain, 3),
        "peak_rss_MB": {str(k): round(v) for k, v in rss.items()},
        "store_bytes_per_token": store.row_bytes,
    }
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
