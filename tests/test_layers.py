"""Layer profiles of cross-layer crosscoders: exact on built weights, and recovering the
planted spans of features that persist across layers."""

import json

import numpy as np
import pytest
import torch

from crosscoders import Crosscoder, CrosscoderConfig, TrainConfig, train
from crosscoders.bench.layers import (
    Point,
    _l0_at_fvu,
    compare_with_per_layer_saes,
    format_comparison,
    planted_layer_data,
)
from crosscoders.cli import main as cli_main
from crosscoders.errors import ConfigError
from crosscoders.layers import firing_frequency, layer_profile


def _model_with_norms(norms_FS):
    F, S = norms_FS.shape
    names = [f"resid:{s}" for s in range(S)]
    model = Crosscoder(CrosscoderConfig(n_sources=S, d_model=8, dict_size=F, k=2,
                                        source_names=names))
    with torch.no_grad():
        unit = model.W_dec / model.W_dec.norm(dim=-1, keepdim=True)
        model.W_dec.copy_(unit * torch.as_tensor(norms_FS, dtype=torch.float32)[..., None])
    return model


def test_profile_columns_on_known_norms():
    norms = np.array([
        [1.0, 0.0, 0.0, 0.0],   # one layer
        [1.0, 1.0, 1.0, 1.0],   # every layer, evenly
        [0.2, 1.0, 0.6, 0.0],   # layers 1-2, peak at 1
        [1.0, 0.1, 0.1, 0.9],   # layers 0 and 3: not contiguous
        [0.0, 0.0, 0.0, 0.0],   # zero decoder
    ])
    model = _model_with_norms(norms)
    profile = layer_profile(model, threshold=0.5)
    c = profile.columns
    assert c["peak"][:4].tolist() == [0, 0, 1, 0]
    assert c["span"].tolist() == [1, 4, 2, 2, 0]
    assert c["first"].tolist() == [0, 0, 1, 0, -1]
    assert c["last"].tolist() == [0, 3, 2, 3, -1]
    assert c["contiguous"].tolist() == [True, True, True, False, False]
    expected_pr = [1.0, 4.0, (0.04 + 1 + 0.36) ** 2 / (0.0016 + 1 + 0.1296),
                   (1 + 0.01 + 0.01 + 0.81) ** 2 / (1 + 1e-4 + 1e-4 + 0.6561), 0.0]
    np.testing.assert_allclose(c["effective_layers"], expected_pr, rtol=1e-5)
    np.testing.assert_allclose(c["norm/resid:2"], norms[:, 2], rtol=1e-5, atol=1e-7)
    s = profile.summary
    assert s["span_counts"] == {"1": 1, "2": 2, "3": 0, "4": 1}
    assert s["n_zero_decoder"] == 1 and s["multi_layer_fraction"] == pytest.approx(0.75)
    assert s["contiguous_fraction_of_multi_layer"] == pytest.approx(2 / 3)
    with pytest.raises(ConfigError, match="fraction of the peak"):
        layer_profile(model, threshold=0)


def _planted_layers(n=32768):
    return planted_layer_data(n=n, n_layers=4, d_model=24)


def test_trained_crosscoder_recovers_planted_spans(tmp_path):
    x, dirs_PSD, spans = _planted_layers()
    P, S, D = dirs_PSD.shape
    cfg = CrosscoderConfig(n_sources=S, d_model=D, dict_size=128, activation="batchtopk", k=2,
                           source_names=[f"resid:{s}" for s in range(S)])
    model = train(cfg, x, TrainConfig(steps=1500, batch_size=512, progress=False,
                                      eval_tokens=0, seed=0), run_dir=tmp_path / "run")
    # match each planted feature to the latent whose whole decoder points its way
    W = (model.W_dec.detach() * model.folded_scale_S[None, :, None]).reshape(128, S * D)
    cos_PF = torch.nn.functional.normalize(dirs_PSD.reshape(P, -1), dim=-1) @ \
        torch.nn.functional.normalize(W, dim=-1).T
    best_cos, best = cos_PF.max(1)
    found = best_cos > 0.9
    assert found.float().mean() >= 0.85
    freq = firing_frequency(model, x[:8192])
    profile = layer_profile(model, freq_F=freq, min_freq=0.01)  # planted ones fire 4%
    got_span = profile.columns["span"][best[found].numpy()]
    assert (got_span == spans[found.numpy()]).mean() >= 0.9
    # never-firing latents keep random decoders spread over all layers: not counted
    assert profile.summary["n_counted"] == int((freq > 0.01).sum()) < 128
    counted = profile.summary["span_counts"]
    planted = {str(n): int((spans == n).sum()) for n in range(1, S + 1)}
    # every planted span shows up; the few extra latents that fire are mostly broad ones
    assert all(counted[n] >= 0.9 * planted[n] for n in planted)
    assert sum(counted.values()) <= 1.25 * sum(planted.values())
    # the CLI writes the same table
    torch.save(x[:8192], tmp_path / "acts.pt")
    assert cli_main(["layers", str(tmp_path / "run"), "--out", str(tmp_path / "layers"),
                     "--data", str(tmp_path / "acts.pt"), "--min-freq", "0.01"]) == 0
    summary = json.loads((tmp_path / "layers" / "summary.json").read_text())
    assert summary["sources"] == [f"resid:{s}" for s in range(S)]
    assert summary["span_counts"] == counted
    assert (tmp_path / "layers" / "layers.csv").exists()
    assert (tmp_path / "layers" / "layers.png").stat().st_size > 1000


# ------------------------------------------------------------------ weakly causal


def test_weakly_causal_structure_survives_training_and_reloading(tmp_path):
    x, _, _ = _planted_layers(n=4096)
    S, D = 4, 24
    cfg = CrosscoderConfig(n_sources=S, d_model=D, dict_size=64, activation="relu",
                           causality="weakly_causal")
    model = train(cfg, x, TrainConfig(steps=60, batch_size=256, progress=False,
                                      eval_tokens=0), run_dir=tmp_path / "run")
    home = torch.arange(64) * S // 64
    assert torch.equal(model.home_source_F, home)
    layer = torch.arange(S)
    reads_elsewhere = (layer[None, :] != home[:, None])[..., None].expand(-1, -1, D)
    writes_earlier = (layer[None, :] < home[:, None])[..., None].expand(-1, -1, D)
    assert bool((model.W_enc_FSD.detach()[reads_elsewhere] == 0).all())
    assert bool((model.W_dec.detach()[writes_earlier] == 0).all())
    assert bool((model.W_dec.detach()[~writes_earlier] != 0).all())  # the rest did train
    # with an elementwise activation the whole map is causal: layer l's reconstruction
    # depends only on layers <= l
    x_changed = x[:512].clone()
    x_changed[:, 2:] += torch.randn_like(x_changed[:, 2:])
    with torch.no_grad():
        before, after = model(x[:512]), model(x_changed)
    torch.testing.assert_close(after[:, :2], before[:, :2], rtol=0, atol=1e-6)
    assert not torch.allclose(after[:, 2:], before[:, 2:])
    again = Crosscoder.load(tmp_path / "run")
    torch.testing.assert_close(again(x[:512]), before, rtol=1e-5, atol=1e-6)
    profile = layer_profile(again)
    assert bool((profile.columns["first"][profile.columns["span"] > 0]
                 >= home.numpy()[profile.columns["span"] > 0]).all())


def test_weakly_causal_sparse_and_dense_steps_agree():
    from crosscoders.train.loss import SparseStep, StepKnobs, dense_loss

    cfg = CrosscoderConfig(n_sources=4, d_model=8, dict_size=128, activation="batchtopk", k=4,
                           causality="weakly_causal")
    x = torch.randn(64, 4, 8, generator=torch.Generator().manual_seed(3))
    grads = []
    for step in (dense_loss, SparseStep()):
        model = Crosscoder(cfg).double()
        step(model, x.double(), StepKnobs(k=4)).total.backward()
        model.constrain_grads()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-10, atol=1e-12)
    assert bool((grads[1]["W_enc_FSD"][:32, 1:] == 0).all())  # home layer 0 reads layer 0


def test_weakly_causal_config_errors():
    with pytest.raises(ConfigError, match="weakly_causal"):
        CrosscoderConfig(n_sources=1, d_model=8, dict_size=16, k=4, causality="weakly_causal")
    with pytest.raises(ConfigError, match="designated"):
        CrosscoderConfig(n_sources=2, d_model=8, dict_size=16, k=4, causality="weakly_causal",
                         n_shared_latents=2)


# ------------------------------------------------------------------ vs per-layer SAEs


def test_l0_at_matched_fvu_interpolates_log_linearly():
    pts = [Point(1, 4.0, 0.4), Point(2, 8.0, 0.1), Point(3, 12.0, 0.01)]
    assert _l0_at_fvu(pts, 0.1) == pytest.approx(8.0)
    assert _l0_at_fvu(pts, 0.2) == pytest.approx(4.0 + 4.0 * 0.5)  # halfway in log FVU
    assert _l0_at_fvu(pts, 0.001) is None and _l0_at_fvu(pts, 0.5) is None


@pytest.mark.slow
def test_crosscoder_needs_fewer_active_latents_than_per_layer_saes():
    acts, _, spans = planted_layer_data(fire_prob=0.15, noise=0.003, d_model=32)
    result = compare_with_per_layer_saes(acts, crosscoder_ks=(2, 4, 6),
                                         per_layer_ks=(1, 2, 3, 4), steps=1000)
    text = format_comparison(result)
    assert len(result["matched"]) >= 3, text
    # each planted feature is one latent for the crosscoder and `span` latents for the
    # SAEs: at equal error the SAEs need about the mean span (2.2) times as many
    assert all(1.8 <= m["ratio"] <= 4.5 for m in result["matched"]), text


# ------------------------------------------------------------------ the pipeline


def test_pipeline_with_one_model_writes_layer_profiles(tmp_path):
    from crosscoders.harvest.config import DataSpec, HarvestConfig, ModelSpec
    from crosscoders.pipeline import run_pipeline
    from crosscoders.pipeline.config import PipelineConfig
    from crosscoders.pipeline.summary import format_summary
    from crosscoders.testing import make_model, make_tokenizer, write_text_corpus

    make_model(tmp_path / "lm", "llama", tokenizer=make_tokenizer(), d_model=32, n_layers=4)
    write_text_corpus(tmp_path / "text.jsonl", 150)
    config = PipelineConfig(
        out=str(tmp_path / "exp"),
        harvest=HarvestConfig(
            models=[ModelSpec(str(tmp_path / "lm"), sites=["0", "1", "2", "3"], name="lm")],
            data=[DataSpec(str(tmp_path / "text.jsonl"))], tokens=3000, context_length=24,
            batch_size=8, store_dtype="float32", device="cpu", eval_tokens=0.1),
        crosscoder={"activation": "relu", "expansion": 4, "causality": "weakly_causal"},
        train=TrainConfig(steps=100, batch_size=128, progress=False),
    )
    result = run_pipeline(config, progress=False, log=lambda m: None)
    assert list(result.stages) == ["harvest", "train", "layers"]
    summary = json.loads((result.layers_dir / "summary.json").read_text())
    assert summary["n_sources"] == 4 and summary["n_counted"] > 0
    model = Crosscoder.load(result.run_dir)
    assert model.config.causality == "weakly_causal" and model.config.n_sources == 4
    text = format_summary(result)
    assert "layer profiles:" in text and "span counts" in text
    again = run_pipeline(config, progress=False, log=lambda m: None)
    assert [o.status for o in again.stages.values()] == ["skipped"] * 3


def test_layers_example_config_is_valid(tmp_path):
    from crosscoders.pipeline import PipelineConfig

    out = tmp_path / "layers.yaml"
    assert cli_main(["init", "--example", "layers", "--out", str(out)]) == 0
    config = PipelineConfig.load(out)
    assert len(config.harvest.models) == 1 and len(config.harvest.models[0].sites) == 6
    assert config.layers.min_freq == 0.0001
