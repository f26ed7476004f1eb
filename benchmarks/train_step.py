"""Time one BatchTopK training step: ours (sparse) vs the dense reference vs the encoder GEMM.

    python benchmarks/train_step.py [--configs A C] [--repeats 5] [--threads N]
                                    [--activation batchtopk|topk]

Prints, per config, milliseconds per step and the ratios the project tracks: our step over
the fp32 encoder-forward GEMM alone (the floor of an fp32 selection: everything else can be
made sparse) and the dense reference step over ours. "ours" is the default trainer, which
screens the selection with a bf16 GEMM where that pays (decided by a probe once per
process, printed first; see docs/training.md); "no screen" is the same step with
``screen="off"``, and "bf16 gemm" the screen's GEMM alone. Also peak RSS of the process
while training config A.
All numbers come from the same run, on the same machine, in the same process.
"""

from __future__ import annotations

import argparse
import time

import torch

from crosscoders import Crosscoder, CrosscoderConfig, TrainConfig
from crosscoders.data import ActivationSource
from crosscoders.model.screen import screen_decision
from crosscoders.train import Trainer

CONFIGS = {
    "A": dict(S=2, D=512, F=16384, B=2048, k=64),
    "C": dict(S=2, D=768, F=32768, B=1024, k=64),
}


def _median_ms(fn, repeats: int) -> float:
    fn()  # warm-up (allocations, lazy init)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1000


class RandomSource(ActivationSource):
    """Endless Gaussian batches [B, S, D] (timing does not depend on the data); no rows in
    order, so the protocol's defaults refuse the analysis's reads."""

    def __init__(self, S: int, D: int):
        self.n_sources, self.d_model = S, D

    def batches(self, batch_size, seed, start=0):
        gen = torch.Generator().manual_seed(seed)
        while True:
            yield torch.randn(batch_size, self.n_sources, self.d_model, generator=gen)

    def eval_batches(self, batch_size):
        return iter(())

    def sample(self, n, seed):
        return torch.randn(n, self.n_sources, self.d_model)

    def describe(self):
        return {"kind": "random"}


def _trainer(S, D, F, B, k, sparse: bool, screen: str = "auto",
             activation: str = "batchtopk") -> Trainer:
    cfg = CrosscoderConfig(n_sources=S, d_model=D, dict_size=F, k=k, activation=activation)
    tc = TrainConfig(steps=10**6, batch_size=B, sparse_kernels=sparse, progress=False,
                     eval_tokens=0, norm_sample_tokens=B, screen=screen)
    trainer = Trainer(Crosscoder(cfg), RandomSource(S, D), tc)
    trainer.init_from_data()
    return trainer


def bench_config(S, D, F, B, k, repeats: int, activation: str = "batchtopk") -> dict:
    """Median ms of the trainer's own step (forward, loss, backward, clip, Adam)."""
    torch.manual_seed(0)
    x_BSD = torch.randn(B, S, D)
    times = {}
    for name, sparse, screen in (("ours", True, "auto"), ("no_screen", True, "off"),
                                 ("dense", False, "off")):
        trainer = _trainer(S, D, F, B, k, sparse, screen, activation)
        times[name] = _median_ms(lambda t=trainer: t.train_step(x_BSD),
                                 repeats if sparse else max(2, repeats // 2))
        times[f"{name}_screened"] = trainer.sparse_step.screen
        del trainer
    model = Crosscoder(CrosscoderConfig(n_sources=S, d_model=D, dict_size=F, k=k))
    x_BX = x_BSD.reshape(B, S * D)
    W_XF = model.W_enc.detach().reshape(S * D, F)
    out_BF = torch.empty(B, F)
    gemm = _median_ms(lambda: torch.addmm(model.b_enc.detach(), x_BX, W_XF, out=out_BF), repeats)
    x_bf, W_bf = x_BX.bfloat16(), W_XF.bfloat16()
    out_bf = torch.empty(B, F, dtype=torch.bfloat16)
    gemm_bf16 = _median_ms(lambda: torch.mm(x_bf, W_bf, out=out_bf), repeats)
    ours, dense = times["ours"], times["dense"]
    return {"gemm_ms": gemm, "gemm_bf16_ms": gemm_bf16, "ours_ms": ours,
            "no_screen_ms": times["no_screen"], "dense_ms": dense,
            "screened": times["ours_screened"], "ours_over_gemm": ours / gemm,
            "no_screen_over_gemm": times["no_screen"] / gemm, "dense_over_ours": dense / ours}


def peak_rss_training_a(steps: int = 10) -> float:
    """Peak RSS (GB) of this process while `crosscoders.train` runs config A."""
    import psutil

    from crosscoders import train

    c = CONFIGS["A"]
    proc = psutil.Process()
    peak = [proc.memory_info().rss]

    class Watched(RandomSource):
        def batches(self, batch_size, seed, start=0):
            for batch in super().batches(batch_size, seed, start):
                peak[0] = max(peak[0], proc.memory_info().rss)
                yield batch

    cfg = CrosscoderConfig(n_sources=c["S"], d_model=c["D"], dict_size=c["F"], k=c["k"])
    train(cfg, Watched(c["S"], c["D"]), TrainConfig(steps=steps, batch_size=c["B"],
                                                     progress=False, eval_tokens=0))
    peak[0] = max(peak[0], proc.memory_info().rss)
    return peak[0] / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["A", "C"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-rss", action="store_true")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--activation", default="batchtopk", choices=["batchtopk", "topk"])
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"cpu capability {torch.backends.cpu.get_cpu_capability()}, {args.activation}")
    decision = screen_decision(torch.device("cpu"))
    print(f"screen auto: {'on' if decision.available else 'off'} ({decision.reason}; "
          f"cpu bf16 features: {', '.join(decision.cpu_features) or 'none reported'})")
    if not args.no_rss:
        print(f"peak RSS while training config A: {peak_rss_training_a():.2f} GB")
    header = (f"{'config':6} {'gemm ms':>8} {'bf16 ms':>8} {'ours ms':>8} {'no-screen':>9} "
              f"{'dense ms':>9} {'ours/gemm':>10} {'no-screen/gemm':>15} {'dense/ours':>11}")
    print(header)
    for name in args.configs:
        r = bench_config(**CONFIGS[name], repeats=args.repeats, activation=args.activation)
        print(f"{name:6} {r['gemm_ms']:8.1f} {r['gemm_bf16_ms']:8.1f} {r['ours_ms']:8.1f} "
              f"{r['no_screen_ms']:9.1f} {r['dense_ms']:9.1f} {r['ours_over_gemm']:10.2f} "
              f"{r['no_screen_over_gemm']:15.2f} {r['dense_over_ours']:11.2f}"
              + ("" if r["screened"] else "   (screen auto is off here: ours = no-screen)"))


if __name__ == "__main__":
    main()
