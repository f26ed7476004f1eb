"""Training: it learns, it saves and loads, it folds normalisation, it resumes exactly."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from crosscoders import Crosscoder, CrosscoderConfig, TrainConfig, train
from crosscoders.cli import main as cli_main
from crosscoders.errors import CrosscodersError, DataError, TrainingDiverged
from helpers import planted_acts

FAST = dict(batch_size=256, progress=False, eval_tokens=512, eval_every=50, log_every=10)


def _cfg(**kw):
    return CrosscoderConfig(**{"n_sources": 2, "d_model": 16, "dict_size": 96, "k": 4, **kw})


@pytest.mark.parametrize("activation", ["relu", "topk", "batchtopk", "jumprelu"])
def test_training_reduces_reconstruction_error(activation, tmp_path):
    acts, _ = planted_acts()
    scale = torch.tensor([3.0, 0.2])[:, None]  # sources on very different scales
    acts = acts * scale
    model = train(_cfg(activation=activation), acts, TrainConfig(steps=150, **FAST),
                  run_dir=tmp_path)
    x = acts[:1024]
    fvu = ((model(x) - x).pow(2).sum((0, 2)) / (x - x.mean(0)).pow(2).sum((0, 2)))
    assert fvu.max() < 0.5, fvu  # per source: normalisation keeps the small source in play
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().split("\n")
               if line]
    train_rec = [r for r in records if r["split"] == "train"]
    assert train_rec[-1]["recon"] < 0.5 * train_rec[0]["recon"]
    assert {"fvu/source_0", "fvu/source_1", "l0", "dead_frac"} <= set(records[-1])


def test_saved_model_works_on_raw_activations(tmp_path):
    acts, _ = planted_acts(n=2048)
    acts = acts * torch.tensor([5.0, 0.5])[:, None]
    model = train(_cfg(), acts, TrainConfig(steps=40, **FAST), run_dir=tmp_path)
    assert model.is_folded
    scale = model.folded_scale_S.clone()
    loaded = Crosscoder.load(tmp_path)
    x = acts[:64]
    assert torch.equal(loaded(x), model(x))
    # folding is exact: the unfolded model on normalised inputs gives the same codes
    unfolded = Crosscoder.load(tmp_path)
    unfolded.unfold_normalisation()
    x_norm = x * scale[:, None]
    assert torch.allclose(unfolded.encode(x_norm), model.encode(x), atol=1e-4, rtol=1e-4)
    assert torch.allclose(unfolded(x_norm) / scale[:, None], model(x), atol=1e-4, rtol=1e-4)
    # manual equations on the public attributes give the model's outputs
    pre = torch.einsum("bsd,sdf->bf", x, model.W_enc) + model.b_enc
    f = model.encode(x)
    assert torch.allclose(f[f > 0], pre[f > 0], atol=1e-4)
    xhat = torch.einsum("bf,fsd->bsd", f, model.W_dec) + model.b_dec
    assert torch.allclose(xhat, model(x), atol=1e-4)
    with pytest.raises(CrosscodersError, match="already folded"):
        model.fold_normalisation(scale)


def test_batchtopk_inference_does_not_depend_on_batch(tmp_path):
    acts, _ = planted_acts(n=2048)
    model = train(_cfg(), acts, TrainConfig(steps=60, **FAST))
    assert model.activation.has_threshold
    x = acts[:32]
    together = model.encode(x)
    alone = torch.cat([model.encode(x[i: i + 1]) for i in range(32)])
    assert torch.equal(together > 0, alone > 0)  # same latents fire (GEMM rounding aside)
    assert torch.allclose(together, alone, atol=1e-5)
    assert 1 <= (together > 0).sum(-1).float().mean() <= 12


def test_sparse_and_dense_training_agree():
    acts, _ = planted_acts(n=1024)
    acts = acts.double()
    cfg = _cfg(activation="batchtopk")
    results = []
    for sparse in (True, False):
        model = Crosscoder(cfg).double()
        results.append(train(model, acts, TrainConfig(steps=20, sparse_kernels=sparse, **FAST)))
    for (name, a), b in zip(results[0].state_dict().items(), results[1].state_dict().values()):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-10), name


def test_passed_model_is_not_modified():
    acts, _ = planted_acts(n=1024)
    model = Crosscoder(_cfg())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train(model, acts, TrainConfig(steps=5, **FAST))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


RUNNER = textwrap.dedent("""
    import sys, torch
    torch.set_num_threads(1)
    sys.path.insert(0, {tests!r})
    from helpers import planted_acts
    from crosscoders import CrosscoderConfig, TrainConfig, train
    acts, _ = planted_acts(n=4096)
    cfg = CrosscoderConfig(n_sources=2, d_model=16, dict_size=128, k=4)
    tc = TrainConfig(steps={steps}, batch_size=128, checkpoint_every=3, eval_every=25,
                     log_every=5, eval_tokens=256, progress=False, screen="on")
    train(cfg, acts, tc, run_dir=sys.argv[1])
""")


def _run_training(run_dir, steps, kill_after=None):
    script = RUNNER.format(tests=str(Path(__file__).parent), steps=steps)
    proc = subprocess.Popen([sys.executable, "-c", script, str(run_dir)])
    if kill_after is None:
        assert proc.wait(timeout=300) == 0
        return
    ckpt = Path(run_dir) / "checkpoint.pt"
    deadline = time.time() + 120
    while not ckpt.exists() and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(kill_after)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def test_resume_after_kill_gives_identical_weights(tmp_path):
    steps = 400
    _run_training(tmp_path / "ref", steps)
    reference = load_file(str(tmp_path / "ref" / "model.safetensors"))
    for attempt, delay in enumerate((0.02, 0.4)):
        run = tmp_path / f"killed{attempt}"
        _run_training(run, steps, kill_after=delay)
        assert not (run / "model.safetensors").exists(), "kill came too late to test resume"
        _run_training(run, steps)  # same command again: resumes
        resumed = load_file(str(run / "model.safetensors"))
        for name in reference:
            assert torch.equal(reference[name], resumed[name]), name
        lines = (run / "metrics.jsonl").read_text().splitlines()
        steps_logged = [json.loads(x)["step"] for x in lines if '"train"' in x]
        assert steps_logged == list(range(5, steps + 1, 5))  # no duplicates after resume


def test_nan_loss_stops_and_keeps_last_checkpoint(tmp_path):
    acts, _ = planted_acts(n=512)
    batches = [acts[i * 64:(i + 1) * 64] for i in range(8)]
    batches[6] = batches[6] * 1e30  # finite, but its squared error overflows
    tc = TrainConfig(steps=8, normalise=False, init_b_dec_from_mean=False, checkpoint_every=2,
                     **{**FAST, "eval_tokens": 0})
    with pytest.raises(TrainingDiverged, match="step 6.*last good checkpoint"):
        train(_cfg(activation="relu"), batches, tc, run_dir=tmp_path)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert state["step"] == 6 and all(torch.isfinite(v).all() for v in state["model"].values())


# ----------------------------------------------------------------- bad input


def test_bad_inputs_give_clear_errors(tmp_path):
    acts, _ = planted_acts(n=256)
    tc = TrainConfig(steps=2, **FAST)
    with pytest.raises(DataError, match=r"shape \[N, S, D\]"):
        train(_cfg(), acts[:, 0], tc)
    with pytest.raises(DataError, match="S=3.*D=16"):
        train(_cfg(n_sources=3), acts, tc)
    with pytest.raises(DataError, match="D=8"):
        train(_cfg(d_model=8), acts, tc)
    bad = acts.clone()
    bad[7, 1, 3] = float("nan")
    with pytest.raises(DataError, match="NaN or inf"):
        train(_cfg(), bad, tc)
    with pytest.raises(DataError, match="empty"):
        train(_cfg(), acts[:0], tc)
    with pytest.raises(DataError, match="iterable is empty"):
        train(_cfg(), iter([]), tc)
    for k in (0, 97):
        with pytest.raises(CrosscodersError, match="k must be between 1 and dict_size=96"):
            _cfg(k=k)
    with pytest.raises(CrosscodersError, match="unknown activation 'gelu'; choose one of"):
        _cfg(activation="gelu")
    with pytest.raises(CrosscodersError, match="unknown key crosscoder"):
        CrosscoderConfig.from_dict({"n_sources": 2, "d_model": 4, "dict_size": 8,
                                    "crosscoder": 1})
    with pytest.raises(DataError, match="shape"):
        Crosscoder(_cfg()).encode(torch.zeros(4, 3, 16))


def test_incompatible_run_directory(tmp_path):
    acts, _ = planted_acts(n=1024)
    train(_cfg(), acts, TrainConfig(steps=4, **FAST), run_dir=tmp_path)
    with pytest.raises(CrosscodersError, match="crosscoder.dict_size=96.*another run directory"):
        train(_cfg(dict_size=128), acts, TrainConfig(steps=4, **FAST), run_dir=tmp_path)
    with pytest.raises(CrosscodersError, match="train.lr"):
        train(_cfg(), acts, TrainConfig(steps=4, lr=1e-2, **FAST), run_dir=tmp_path)
    with pytest.raises(CrosscodersError, match="train.screen"):
        train(_cfg(), acts, TrainConfig(steps=4, screen="off", **FAST), run_dir=tmp_path)


def test_run_written_before_a_new_train_option_still_resumes(tmp_path):
    acts, _ = planted_acts(n=1024)
    train(_cfg(), acts, TrainConfig(steps=4, **FAST), run_dir=tmp_path)
    run = json.loads((tmp_path / "run.json").read_text())
    del run["train"]["screen"]  # as written by a version without the option
    (tmp_path / "run.json").write_text(json.dumps(run))
    train(_cfg(), acts, TrainConfig(steps=4, **FAST), run_dir=tmp_path)  # not refused


# ----------------------------------------------------------------- CLI and files


@pytest.mark.parametrize("suffix", [".npy", ".pt", ".safetensors"])
def test_cli_train_on_files_and_resume(tmp_path, suffix, capsys):
    acts, _ = planted_acts(n=1024)
    path = tmp_path / f"acts{suffix}"
    if suffix == ".npy":
        np.save(path, acts.numpy())
    elif suffix == ".pt":
        torch.save(acts, path)
    else:
        save_file({"activations": acts}, str(path))
    out = tmp_path / "run"
    argv = ["train", "--data", str(path), "--out", str(out), "--dict-size", "64", "--k", "4",
            "--batch-size", "128", "--no-progress", "--source-names", "base", "chat", "--steps"]
    assert cli_main(argv + ["6"]) == 0
    model = Crosscoder.load(out)
    assert model.config.source_names == ["base", "chat"] and model.W_dec.shape == (64, 2, 16)
    first = load_file(str(out / "model.safetensors"))
    assert cli_main(argv + ["6"]) == 0  # finished run: resuming changes nothing
    assert all(torch.equal(v, load_file(str(out / "model.safetensors"))[k])
               for k, v in first.items())
    assert cli_main(argv + ["9"]) == 2
    assert "train.steps" in capsys.readouterr().err


def test_cli_reports_bad_file(tmp_path, capsys):
    path = tmp_path / "acts.txt"
    path.write_text("nope")
    assert cli_main(["train", "--data", str(path), "--out", str(tmp_path / "r")]) == 2
    assert "unsupported data file acts.txt" in capsys.readouterr().err


def test_bf16_autocast_trains_close_to_fp32():
    acts, _ = planted_acts(n=2048)
    models = [train(_cfg(), acts, TrainConfig(steps=60, autocast=a, **FAST))
              for a in ("none", "bf16")]
    x = acts[:512]
    with torch.no_grad():
        fvu = [float((m(x) - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()) for m in models]
    assert fvu[1] < 0.5 and abs(fvu[0] - fvu[1]) < 0.1, fvu


def test_schedules():
    from crosscoders.data import TensorSource
    from crosscoders.train import Trainer

    acts, _ = planted_acts(n=512)
    tc = TrainConfig(steps=100, lr=1e-3, lr_warmup_frac=0.1, lr_decay_frac=0.2, l1_coeff=4.0,
                     l1_warmup_frac=0.5, k_start=32, k_anneal_frac=0.5, **FAST)
    trainer = Trainer(Crosscoder(_cfg(k=4)), TensorSource(acts), tc)
    assert trainer.lr_at(0) == pytest.approx(1e-4) and trainer.lr_at(9) == pytest.approx(1e-3)
    assert trainer.lr_at(50) == 1e-3 and trainer.lr_at(90) == pytest.approx(0.5e-3)
    assert trainer.knobs_at(0).k == 32 and trainer.knobs_at(25).k == 18
    assert trainer.knobs_at(50).k == 4 and trainer.knobs_at(99).k == 4
    assert trainer.knobs_at(24).sparsity_coeff == pytest.approx(2.0)
    assert trainer.knobs_at(80).sparsity_coeff == 4.0
    short = Trainer(Crosscoder(_cfg(k=4)), TensorSource(acts),
                    TrainConfig(steps=1, lr=1e-3, **FAST))
    assert short.lr_at(0) == 1e-3  # a warm-up shorter than one step never overshoots


def test_batchtopk_threshold_is_running_mean_then_ema():
    from crosscoders.model.activations import BatchTopK

    act = BatchTopK(4, threshold_beta=0.9)
    for value in (1.0, 2.0, 3.0):
        act.update_threshold(value)
    assert float(act.threshold) == pytest.approx(2.0)  # mean of the first updates
    for _ in range(200):
        act.update_threshold(10.0)
    assert float(act.threshold) == pytest.approx(10.0, rel=1e-6)
    act.update_threshold(0.0)
    assert float(act.threshold) == pytest.approx(9.0)  # EMA with weight 1 - beta


@pytest.mark.parametrize("activation", ["relu", "batchtopk"])
def test_designated_shared_and_exclusive_latents_stay_designated(activation):
    acts, _ = planted_acts(n=2048)
    cfg = _cfg(activation=activation, n_shared_latents=8, n_exclusive_latents=[4, 6])
    model = train(cfg, acts, TrainConfig(steps=40, **FAST))
    W = model.W_dec.detach() * model.folded_scale_S[None, :, None]  # normalised units
    assert torch.allclose(W[:8, 0], W[:8, 1], rtol=1e-6, atol=0) and W[:8].abs().sum() > 0
    assert W[8:12, 1].abs().sum() == 0 and W[8:12, 0].abs().sum() > 0
    assert W[12:18, 0].abs().sum() == 0 and W[12:18, 1].abs().sum() > 0
    assert W[18:].abs().sum(-1).min() > 0
    if activation == "relu":  # shared latents pay a reduced penalty
        w = model.decoder_norm_weights()
        assert torch.allclose(model.sparsity_weights()[:8], 0.15 * w[:8])
        assert torch.equal(model.sparsity_weights()[8:], w[8:])
    with pytest.raises(CrosscodersError, match="n_shared_latents"):
        _cfg(n_shared_latents=90, n_exclusive_latents=[4, 6])


def test_screened_selection_trains_like_fp32_selection():
    acts, _ = planted_acts(n=1024)
    cfg = _cfg(activation="batchtopk", dict_size=128)
    results = [train(Crosscoder(cfg), acts, TrainConfig(steps=20, screen=screen, **FAST))
               for screen in ("on", "off")]
    for (name, a), b in zip(results[0].state_dict().items(), results[1].state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
