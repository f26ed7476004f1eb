"""Throughput of the diffing analysis pass vs the crosscoder's own encode on the same data.

    python benchmarks/diff.py [--tokens N] [--d-model D] [--expansion E] [--k K] [--store]

The pass is what ``crosscoders diff`` does in its one read of the data: encode, sparse
decode, activation statistics, Latent Scaling (here for *every* latent, the worst case)
and example collection (every latent). The baseline reads the same rows in the same
batches and only calls ``model.encode``. Target: pass >= 0.7x the encode throughput.
With ``--store`` both read from an activation store written to a temporary directory.

Where the bf16-screened selection applies (CPUs where it pays, see docs/training.md), both the
pass and ``encode`` use it; "fp32 encode" is ``encode`` with it switched off
(``model.screen_inference = False``), the encoder-GEMM baseline it replaces.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from crosscoders import Crosscoder, CrosscoderConfig
from crosscoders.data import as_source
from crosscoders.diff.examples import ExampleCollector
from crosscoders.diff.latent_scaling import LatentScalingAccumulator
from crosscoders.diff.stats import ActivationStats, analysis_pass


def _write_store(path: Path, x: torch.Tensor):
    from crosscoders.store import ShardMeta, StoreWriter
    from crosscoders.store import format as fmt

    N, S, D = x.shape
    T = 128
    writer = StoreWriter(path, {"bench": 1}, n_sources=S, d_model=D, dtype="float32")
    rows = np.zeros(N, fmt.ROW_DTYPE)
    rows["context"] = np.arange(N) // T
    rows["position"] = np.arange(N) % T
    rows["token"] = np.arange(N) % 1000
    contexts = (np.arange(N).reshape(-1, T) % 1000).astype(np.int32)
    writer.commit(0, "m", {s: x[:, s].numpy() for s in range(S)},
                  ShardMeta(rows, contexts, 0, N // T))
    writer.end(1, N)
    writer.finalize({"sources": [{"name": f"s{s}"} for s in range(S)], "eval_tokens": 0})
    from crosscoders.store import ActivationStore

    return ActivationStore.open(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=1 << 16)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--expansion", type=int, default=16)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--store", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--subset", type=float, default=1.0,
                   help="fraction of latents given Latent Scaling and examples (1 = all, the "
                        "worst case; diff's defaults use the exclusive latents, a few percent)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    D, F = args.d_model, args.expansion * args.d_model
    cfg = CrosscoderConfig(n_sources=2, d_model=D, dict_size=F, activation="batchtopk", k=args.k)
    model = Crosscoder(cfg).eval()
    x = torch.randn(args.tokens, 2, D)
    with torch.no_grad():  # a trained model's inference threshold: about k latents per token
        sample = x[:4096]
        scores = torch.relu(model.preactivations(sample)) * model.decoder_norm_weights()
        model.activation.threshold.fill_(float(scores.flatten().topk(args.k * len(sample))
                                               .values[-1]))
    with tempfile.TemporaryDirectory() as tmp:
        data = _write_store(Path(tmp) / "store", x) if args.store else x
        source = as_source(data, token_ids=None if args.store else np.arange(args.tokens) % 1000)

        def encode_only() -> None:
            with torch.inference_mode():
                for s in range(0, source.n_tokens, args.batch_size):
                    model.encode(source.rows(s, min(source.n_tokens, s + args.batch_size)))

        def fp32_encode() -> None:
            model.screen_inference = False
            try:
                encode_only()
            finally:
                model.screen_inference = None

        subset = np.random.default_rng(0).choice(F, size=max(1, int(args.subset * F)),
                                                 replace=False)

        def full_pass() -> None:
            consumers = [
                ActivationStats(F, 2, D, special_ids=range(10)),
                LatentScalingAccumulator(model, subset),
                ExampleCollector(F, subset, n_top=10, n_samples=10),
            ]
            analysis_pass(model, source, consumers, args.batch_size, progress=False)

        encode_only()  # warm-up
        wall: dict[str, list[float]] = {"encode": [], "pass": [], "fp32": []}
        cpu: dict[str, list[float]] = {"encode": [], "pass": [], "fp32": []}
        for _ in range(args.repeats):  # alternate, so load from other processes hits all
            for name, fn in (("encode", encode_only), ("pass", full_pass),
                             ("fp32", fp32_encode)):
                w, c = time.perf_counter(), time.process_time()
                fn()
                wall[name].append(time.perf_counter() - w)
                cpu[name].append(time.process_time() - c)
    print(f"tokens {args.tokens}, D {D}, F {F}, k {args.k}, batch {args.batch_size}, "
          f"threads {args.threads}, data {'store' if args.store else 'tensor'}, "
          f"best of {args.repeats}, Latent Scaling and examples on {len(subset)} latents")
    for label, times in (("wall", wall), ("cpu", cpu)):
        tps = {k: args.tokens / min(v) for k, v in times.items()}
        print(f"{label:<4} encode only {tps['encode']:>9.0f} tok/s | analysis pass "
              f"{tps['pass']:>9.0f} tok/s | ratio {tps['pass'] / tps['encode']:.2f}x | "
              f"fp32 encode {tps['fp32']:>9.0f} tok/s, pass / fp32 encode "
              f"{tps['pass'] / tps['fp32']:.2f}x")
    print("analysis = encode + sparse decode + stats + Latent Scaling + examples; "
          "target ratio >= 0.7x (cpu time: robust to other processes)")


if __name__ == "__main__":
    main()
