"""Time one training step on a GPU: ours (sparse) in fp32, TF32 and bf16 autocast, the dense
reference, and the encoder GEMM alone in fp32, TF32 and bf16.

    python benchmarks/gpu_step.py [--configs G L] [--repeats 10] [--json FILE]
                                  [--end-to-end] [--breakdown] [--device cuda]

Config G is Gemma-2-2b scale (S=2, D=2304, F=73728, B=4096, k=100), config L a 4096-wide
model with 128k latents. Prints per config milliseconds per step, the ratios the project
tracks (our fp32 step over the fp32 encoder GEMM, our bf16 step over the bf16 GEMM, the
dense reference over ours) and peak GPU memory per variant. ``--breakdown`` times the
parts of our step (selection, sparse forward/backward, clip, Adam) one by one;
``--end-to-end`` times ``crosscoders.train`` fed from an in-memory bf16 tensor against
the bare step (the data path's cost). All numbers come from one run on one device.
``--device cpu --configs T`` runs a tiny config to check the script itself.
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable

import torch

from crosscoders import Crosscoder, CrosscoderConfig, TrainConfig
from crosscoders.io import write_json
from crosscoders.train import Trainer
from train_step import RandomSource  # the same timing-neutral source (benchmarks/)

CONFIGS = {
    "G": dict(S=2, D=2304, F=73728, B=4096, k=100),
    "L": dict(S=2, D=4096, F=131072, B=4096, k=100),
    "T": dict(S=2, D=64, F=2048, B=256, k=8),  # tiny: checks the script on a CPU
}


class _Timer:
    def __init__(self, device: torch.device):
        self.device = device

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def median_ms(self, fn: Callable[[], object], repeats: int, warmup: int = 2) -> float:
        for _ in range(warmup):
            fn()
        self.sync()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - start)
        return sorted(times)[len(times) // 2] * 1000


def _set_tf32(on: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = on


def _peak_gb(device: torch.device) -> float:
    if device.type != "cuda":
        return float("nan")
    return torch.cuda.max_memory_allocated(device) / 2**30


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _trainer(model: Crosscoder, S, D, B, device, sparse: bool, autocast: str) -> Trainer:
    tc = TrainConfig(steps=10**6, batch_size=B, sparse_kernels=sparse, progress=False,
                     eval_tokens=0, norm_sample_tokens=B, device=str(device),
                     autocast=autocast, screen="off")
    trainer = Trainer(copy.deepcopy(model), RandomSource(S, D), tc)
    trainer.init_from_data()
    return trainer


def bench_config(name: str, S, D, F, B, k, repeats: int, device: torch.device,
                 breakdown: bool = False, end_to_end: bool = False) -> dict:
    timer = _Timer(device)
    gen = torch.Generator().manual_seed(0)
    cfg = CrosscoderConfig(n_sources=S, d_model=D, dict_size=F, k=k, activation="batchtopk")
    model = Crosscoder(cfg).to(device)
    x_BSD = torch.randn(B, S, D, generator=gen).to(device)
    result: dict = {"config": name, "S": S, "D": D, "F": F, "B": B, "k": k}

    result.update(_gemm_times(model, x_BSD, timer, repeats))
    flops = 2 * B * S * D * F
    for label in ("gemm_fp32", "gemm_tf32", "gemm_bf16"):
        result[f"{label}_tflops"] = flops / (result[f"{label}_ms"] / 1000) / 1e12

    variants = (("ours_fp32", True, "none", False), ("ours_tf32", True, "none", True),
                ("ours_bf16", True, "bf16", False), ("dense_fp32", False, "none", False))
    for label, sparse, autocast, tf32 in variants:
        _set_tf32(tf32)
        _reset_peak(device)
        trainer = _trainer(model, S, D, B, device, sparse, autocast)
        reps = repeats if sparse else max(3, repeats // 3)
        result[f"{label}_ms"] = timer.median_ms(lambda t=trainer: t.train_step(x_BSD), reps)
        result[f"{label}_peak_gb"] = _peak_gb(device)
        if breakdown and label in ("ours_fp32", "ours_bf16"):
            result[f"{label}_parts_ms"] = _breakdown(trainer, x_BSD, timer, repeats)
        del trainer
    _set_tf32(False)
    _reset_peak(device)

    if end_to_end:
        result.update(_end_to_end(model, S, D, B, device, timer, repeats, result))

    result["ours_fp32_over_gemm_fp32"] = result["ours_fp32_ms"] / result["gemm_fp32_ms"]
    result["ours_tf32_over_gemm_tf32"] = result["ours_tf32_ms"] / result["gemm_tf32_ms"]
    result["ours_bf16_over_gemm_bf16"] = result["ours_bf16_ms"] / result["gemm_bf16_ms"]
    result["dense_over_ours_fp32"] = result["dense_fp32_ms"] / result["ours_fp32_ms"]
    del model
    _reset_peak(device)
    return result


def _gemm_times(model: Crosscoder, x_BSD, timer: _Timer, repeats: int) -> dict:
    """The encoder GEMM alone: the floor of any step that selects from fp32 scores."""
    B, S, D = x_BSD.shape
    F = model.dict_size
    x_BX = x_BSD.reshape(B, S * D)
    W_XF = model.W_enc.detach().reshape(S * D, F).contiguous()
    out_BF = torch.empty(B, F, device=x_BSD.device)
    b_F = model.b_enc.detach()
    times = {}
    for label, tf32 in (("gemm_fp32", False), ("gemm_tf32", True)):
        _set_tf32(tf32)
        times[f"{label}_ms"] = timer.median_ms(
            lambda: torch.addmm(b_F, x_BX, W_XF, out=out_BF), repeats)
    _set_tf32(False)
    x_bf, W_bf = x_BX.bfloat16(), W_XF.bfloat16()
    out_bf = torch.empty(B, F, dtype=torch.bfloat16, device=x_BSD.device)
    times["gemm_bf16_ms"] = timer.median_ms(lambda: torch.mm(x_bf, W_bf, out=out_bf), repeats)
    return times


def _breakdown(trainer: Trainer, x_BSD, timer: _Timer, repeats: int) -> dict:
    """Each part of the step timed alone, in the order the step runs them."""
    from crosscoders.model.sparse import SparseCodes, gather_preacts, sparse_decode, squared_error

    model, step = trainer.model, trainer.sparse_step
    knobs = trainer.knobs_at(trainer.step)
    B, S, D = x_BSD.shape
    x_BX = x_BSD.reshape(B, -1)
    parts = {}
    with trainer.autocast():
        with torch.no_grad():
            w_F = model.decoder_norm_weights()
            parts["select"] = timer.median_ms(lambda: step.select(model, x_BX, w_F, knobs),
                                              repeats)
            selected, _, _ = step.select(model, x_BX, w_F, knobs)
        token_idx, latent_idx, pre_E = selected.token_E, selected.latent_E, selected.value_E

        def forward():
            codes = SparseCodes(token_idx, latent_idx, pre_E, B, model.dict_size,
                                step.workspace)  # fresh, as each step makes them
            values_E = torch.relu(gather_preacts(pre_E, x_BX, model.W_enc_FSD, model.b_enc,
                                                 codes))
            xhat = sparse_decode(codes.with_values(values_E), model.W_dec, model.b_dec)
            return squared_error(x_BX, xhat, step.workspace)

        def forward_backward():
            loss = forward()
            trainer.optimizer.zero_grad(set_to_none=True)
            loss.backward()

        parts["sparse_fwd"] = timer.median_ms(forward, repeats)
        parts["sparse_fwd_bwd"] = timer.median_ms(forward_backward, repeats)
    parts.update(_decode_alternatives(model, token_idx, latent_idx, pre_E, B, timer, repeats))
    forward_backward()
    parts["clip"] = timer.median_ms(lambda: trainer.clip_gradients(1e-30), repeats)
    trainer.optimizer.grad_scale = None
    parts["adam"] = timer.median_ms(trainer.optimizer.step, repeats)
    return parts


def _decode_alternatives(model, token_idx, latent_idx, pre_E, B, timer, repeats) -> dict:
    """Other exact ways to run the sparse decode, for choosing one per device."""
    import torch.nn.functional as F

    from crosscoders.model.sparse import SparseCodes

    codes = SparseCodes(token_idx, latent_idx, pre_E.float(), B, model.dict_size)
    W_FX = model.W_dec.detach().reshape(model.dict_size, -1)
    offsets = codes.token_offsets_B
    values = codes.value_E.relu()
    out = {"decode_embag_fp32": timer.median_ms(lambda: F.embedding_bag(
        latent_idx, W_FX, offsets, mode="sum", per_sample_weights=values), repeats)}
    W_bf, v_bf = W_FX.bfloat16(), values.bfloat16()
    out["decode_embag_bf16"] = timer.median_ms(lambda: F.embedding_bag(
        latent_idx, W_bf, offsets, mode="sum", per_sample_weights=v_bf), repeats)
    out["cast_W_dec_bf16"] = timer.median_ms(lambda: W_FX.to(torch.bfloat16), repeats)
    csr_BF = torch.sparse_csr_tensor(codes.token_crow, latent_idx, values,
                                     size=(B, model.dict_size))
    out["decode_spmm_fp32"] = timer.median_ms(lambda: csr_BF @ W_FX, repeats)
    return out


def _end_to_end(model, S, D, B, device, timer: _Timer, repeats: int, result: dict) -> dict:
    """``train()`` from an in-memory bf16 tensor vs the bare step, in tokens/s."""
    from crosscoders import train

    steps = max(20, 3 * repeats)
    n = min(16 * B, max(4 * B, int(2e9 // (S * D * 2))))  # at most ~2 GB of host memory
    gen = torch.Generator().manual_seed(1)
    acts = torch.randn(n, S, D, generator=gen, dtype=torch.float32).to(torch.bfloat16)
    tc = TrainConfig(steps=steps, batch_size=B, progress=False, eval_tokens=0,
                     log_every=10**6, eval_every=10**6, norm_sample_tokens=B,
                     device=str(device), screen="off")
    train(copy.deepcopy(model), acts[: 2 * B], TrainConfig(**{**tc.to_dict(), "steps": 2}))
    timer.sync()
    start = time.perf_counter()
    train(copy.deepcopy(model), acts, tc)
    timer.sync()
    seconds = time.perf_counter() - start
    e2e_tok_s = steps * B / seconds
    bare_tok_s = B / (result["ours_fp32_ms"] / 1000)
    return {"e2e_tokens_per_s": e2e_tok_s, "bare_step_tokens_per_s": bare_tok_s,
            "e2e_over_bare": e2e_tok_s / bare_tok_s, "e2e_steps": steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["G", "L"], choices=sorted(CONFIGS))
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--breakdown", action="store_true")
    parser.add_argument("--end-to-end", action="store_true")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"torch {torch.__version__}, device {name}")
    results = []
    for config in args.configs:
        r = bench_config(config, **CONFIGS[config], repeats=args.repeats, device=device,
                         breakdown=args.breakdown, end_to_end=args.end_to_end)
        results.append(r)
        print(f"\nconfig {config}: S={r['S']} D={r['D']} F={r['F']} B={r['B']} k={r['k']}")
        for label in ("gemm_fp32", "gemm_tf32", "gemm_bf16"):
            print(f"  {label:12} {r[label + '_ms']:9.2f} ms  {r[label + '_tflops']:7.1f} TFLOP/s")
        for label in ("ours_fp32", "ours_tf32", "ours_bf16", "dense_fp32"):
            print(f"  {label:12} {r[label + '_ms']:9.2f} ms  peak {r[label + '_peak_gb']:6.1f} GiB")
            if label + "_parts_ms" in r:
                parts = "  ".join(f"{k} {v:.2f}" for k, v in r[label + "_parts_ms"].items())
                print(f"      parts (ms): {parts}")
        print(f"  ours fp32 / fp32 GEMM  {r['ours_fp32_over_gemm_fp32']:6.2f}   (target <= 1.5)")
        print(f"  ours tf32 / tf32 GEMM  {r['ours_tf32_over_gemm_tf32']:6.2f}")
        print(f"  ours bf16 / bf16 GEMM  {r['ours_bf16_over_gemm_bf16']:6.2f}   (target <= 2)")
        print(f"  dense / ours (fp32)    {r['dense_over_ours_fp32']:6.2f}   (target >= 3 at L)")
        if "e2e_over_bare" in r:
            print(f"  train() end to end {r['e2e_tokens_per_s']:,.0f} tok/s vs bare step "
                  f"{r['bare_step_tokens_per_s']:,.0f} tok/s: {r['e2e_over_bare']:.2f}x")
    if args.json:
        write_json(args.json, {"device": name, "torch": torch.__version__, "results": results})


if __name__ == "__main__":
    main()
