import json
import math

import numpy as np
import pytest
import torch

from crosscoders.bench.planted import KINDS, PlantedConfig, make_planted_data
from crosscoders.bench.synthetic import (
    ActivationResult,
    BenchmarkResult,
    concat_cosine,
    confusion_matrix,
    format_benchmark_table,
    match_latents,
    precision_recall,
    run_planted_benchmark,
    score_decoder,
)
from crosscoders.diff.categories import PRESETS, classify_latents
from crosscoders.errors import ConfigError

SMALL = PlantedConfig(
    d_model=32,
    n_shared=12,
    n_shared_rotated=6,
    n_shared_weaker=8,
    n_base_only=6,
    n_chat_only=6,
    n_tokens=4000,
    seed=3,
)


@pytest.fixture(scope="module")
def data():
    return make_planted_data(SMALL)


def oracle_decoder(data, noise=0.01, n_junk=0, seed=0):
    """Decoder = planted directions (randomly rescaled) + noise, plus junk, shuffled."""
    gen = torch.Generator().manual_seed(seed)
    V = data.directions_PSD
    W = V * (0.5 + torch.rand(len(V), 1, 1, generator=gen)) + noise * torch.randn(
        V.shape, generator=gen
    )
    junk = 0.3 * torch.randn(n_junk, *V.shape[1:], generator=gen)
    W = torch.cat([W, junk])
    perm = torch.randperm(len(W), generator=gen)
    return W[perm], perm


# ---------------------------------------------------------------------------------- generator


def test_generator_shapes_and_truth(data):
    P, D = SMALL.n_features, SMALL.d_model
    assert data.acts_NSD.shape == (SMALL.n_tokens, 2, D) and data.acts_NSD.dtype == torch.float32
    assert data.directions_PSD.shape == (P, 2, D) and data.codes_NP.shape == (SMALL.n_tokens, P)
    assert data.kinds == [k for k in KINDS for _ in range(getattr(SMALL, f"n_{k}"))]
    assert data.categories.count("chat_only") == 6 and data.categories.count("base_only") == 6
    assert data.categories.count("shared") == 12 + 6 + 8


def test_generator_is_deterministic(data):
    again = make_planted_data(SMALL)
    assert torch.equal(again.acts_NSD, data.acts_NSD)
    assert torch.equal(again.directions_PSD, data.directions_PSD)
    other = make_planted_data(SMALL.replace(seed=4))
    assert not torch.equal(other.directions_PSD, data.directions_PSD)


def test_planted_directions_by_kind(data):
    V, kinds = data.directions_PSD, np.array(data.kinds)
    norms = V.norm(dim=-1)
    cos = torch.nn.functional.cosine_similarity(V[:, 0], V[:, 1], dim=-1)
    for kind, n_base, n_chat in [
        ("shared", 1.0, 1.0),
        ("shared_rotated", 1.0, 1.0),
        ("base_only", 1.0, 0.0),
        ("chat_only", 0.0, 1.0),
    ]:
        expected = torch.tensor([n_base, n_chat]).expand(int((kinds == kind).sum()), 2)
        torch.testing.assert_close(norms[kinds == kind], expected)
    torch.testing.assert_close(cos[kinds == "shared"], torch.ones(12))
    rotated = cos[kinds == "shared_rotated"]
    assert (rotated >= SMALL.rotated_cos_min - 1e-6).all()
    assert (rotated <= SMALL.rotated_cos_max + 1e-6).all()
    weak = norms[kinds == "shared_weaker"]
    torch.testing.assert_close(weak[0::2], torch.tensor([[0.3, 1.0]] * 4))  # weaker in base
    torch.testing.assert_close(weak[1::2], torch.tensor([[1.0, 0.3]] * 4))  # weaker in chat
    torch.testing.assert_close(cos[kinds == "shared_weaker"], torch.ones(8))


def test_activations_are_codes_times_directions_plus_noise(data):
    clean = torch.einsum("np,psd->nsd", data.codes_NP, data.directions_PSD)
    residual = data.acts_NSD - clean
    assert residual.std().item() == pytest.approx(SMALL.noise_std, rel=0.05)
    fires = data.codes_NP > 0
    assert fires.float().mean().item() == pytest.approx(SMALL.fire_prob, rel=0.1)
    assert data.codes_NP[fires].mean().item() == pytest.approx(1.0, rel=0.05)
    # Exclusive features never touch the other model.
    noiseless = make_planted_data(
        SMALL.replace(
            noise_std=0.0, n_shared=0, n_shared_rotated=0, n_shared_weaker=0, n_chat_only=0
        )
    )
    assert noiseless.acts_NSD[:, 1].abs().max() == 0
    assert noiseless.acts_NSD[:, 0].abs().max() > 0


def test_shifted_features_change_strength_by_the_configured_range():
    cfg = SMALL.replace(n_shared_shifted=6, shift_min=0.2, shift_max=0.7)
    data = make_planted_data(cfg)
    kinds = np.array(data.kinds)
    assert data.kinds[-6:] == ["shared_shifted"] * 6
    # the features planted before them are unchanged (the shifted block comes last)
    torch.testing.assert_close(data.directions_PSD[:-6], make_planted_data(SMALL).directions_PSD)
    ratio = data.strength_ratio[kinds == "shared_shifted"]
    # even: chat stronger by 1 + c, odd: base stronger; c evenly spaced in [0.2, 0.7]
    np.testing.assert_allclose(ratio[0::2], [1.2, 1.45, 1.7], rtol=1e-6)
    np.testing.assert_allclose(1 / ratio[1::2], [1.2, 1.45, 1.7], rtol=1e-6)
    norms = data.directions_PSD[kinds == "shared_shifted"].norm(dim=-1)
    torch.testing.assert_close(norms.max(dim=1).values, torch.ones(6))
    cos = torch.nn.functional.cosine_similarity(*data.directions_PSD[kinds == "shared_shifted"]
                                                .unbind(1), dim=-1)
    torch.testing.assert_close(cos, torch.ones(6))
    assert set(np.asarray(data.categories)[kinds == "shared_shifted"]) == {"shared"}
    assert np.isinf(data.strength_ratio[kinds == "chat_only"]).all()
    assert (data.strength_ratio[kinds == "base_only"] == 0).all()
    with pytest.raises(ConfigError, match="shift_min"):
        PlantedConfig(shift_min=0.5, shift_max=0.2)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"fire_prob": 0.0}, "fire_prob"),
        ({"weaker_fraction": 1.0}, "weaker_fraction"),
        ({"n_chat_only": -1}, "n_chat_only"),
        ({"rotated_cos_min": 0.99}, "rotated_cos_min"),
        (
            {
                "n_shared": 0,
                "n_shared_rotated": 0,
                "n_shared_weaker": 0,
                "n_base_only": 0,
                "n_chat_only": 0,
            },
            "no features",
        ),
    ],
)
def test_config_validation(change, match):
    with pytest.raises(ConfigError, match=match):
        PlantedConfig(**change)


def test_config_round_trip_and_strict_keys(tmp_path):
    SMALL.save(tmp_path / "planted.yaml")
    assert PlantedConfig.load(tmp_path / "planted.yaml") == SMALL
    with pytest.raises(ConfigError, match="unknown key n_chat"):
        PlantedConfig.from_dict({"n_chat": 3})


# ---------------------------------------------------------------------------------- matching


@pytest.mark.parametrize("method", ["hungarian", "max"])
def test_oracle_decoder_is_recovered_and_labelled_perfectly(data, method):
    W, perm = oracle_decoder(data, noise=0.002, n_junk=20)
    match, labels, confusion, scores = score_decoder(W, data, preset="anthropic", method=method)
    assert match.recovery > 0.99 and match.frac_recovered == 1.0
    inverse = torch.argsort(perm).numpy()
    np.testing.assert_array_equal(match.latent_P, inverse[: SMALL.n_features])
    for kind in dict.fromkeys(data.kinds):  # anthropic: all on the diagonal, weaker included
        truth = "shared" if kind.startswith("shared") else kind
        assert confusion[kind, truth] == getattr(SMALL, f"n_{kind}")
    alive = np.zeros(len(W), bool)
    alive[inverse[: SMALL.n_features]] = True  # junk latents are "dead"
    scores = precision_recall(labels, match, data.categories, alive)
    for c in ("shared", "base_only", "chat_only"):
        assert scores[c].recall == 1.0 and scores[c].precision == 1.0


def test_minder_preset_puts_weaker_copies_in_other(data):
    W, _ = oracle_decoder(data)
    _, _, confusion, scores = score_decoder(W, data, preset="minder")
    assert confusion["shared_weaker", "other"] == 8
    assert scores["shared"].recall == pytest.approx(18 / 26)
    assert scores["chat_only"].precision == 1.0 and scores["base_only"].precision == 1.0


def test_cosine_uses_concatenated_vectors():
    V = torch.zeros(2, 2, 3)
    V[0, 1, 0] = 1.0  # chat-only along e0
    V[1, :, 0] = 1.0  # shared along e0
    W = torch.zeros(3, 2, 3)
    W[0, 1, 0] = 2.0  # chat-only latent
    W[1, :, 0] = 0.5  # shared latent
    W[2, 0, 0] = 1.0  # base-only latent
    cos = concat_cosine(W, V)
    expected = torch.tensor([[1.0, 2**-0.5], [2**-0.5, 1.0], [0.0, 2**-0.5]]).double()
    torch.testing.assert_close(cos, expected)
    with pytest.raises(ValueError, match="agree on S and D"):
        concat_cosine(W, torch.zeros(2, 2, 4))


def test_hungarian_is_one_to_one_and_max_is_not():
    V = torch.eye(3).reshape(3, 1, 3).repeat(1, 2, 1)  # three shared features
    W = torch.stack([V[0], V[0] + 0.1 * V[1]])  # two latents, both close to feature 0
    hung = match_latents(W, V, "hungarian")
    assert sorted(hung.latent_P[hung.latent_P >= 0].tolist()) == [0, 1]
    assert (hung.latent_P == -1).sum() == 1 and hung.cosine_P[hung.latent_P == -1] == 0
    best = match_latents(W, V, "max")
    assert best.latent_P[0] == 0 and best.cosine_P[0] == pytest.approx(1.0)
    assert best.recovery >= hung.recovery
    with pytest.raises(ConfigError, match="hungarian"):
        match_latents(W, V, "greedy")


def test_recovery_threshold():
    V = torch.eye(4).reshape(4, 1, 4)
    W = V.clone()
    W[3, 0] = torch.tensor([0.0, 0.0, 0.6, 0.8])  # cos 0.8 with feature 3
    m = match_latents(W, V, threshold=0.9)
    assert m.frac_recovered == 0.75 and m.recovery == pytest.approx(0.95)
    assert match_latents(W, V, threshold=0.7).frac_recovered == 1.0


# ------------------------------------------------------------------------- confusion, scores


def test_confusion_matrix_counts_and_missed():
    cm = confusion_matrix(
        ["shared", "chat_only", "chat_only", "other", "base_only"],
        ["shared", "chat_only", "shared", "chat_only", "base_only"],
        recovered=[True, True, True, False, True],
    )
    assert cm.rows == ["shared", "base_only", "chat_only"]
    assert cm.cols == ["shared", "base_only", "chat_only", "other", "missed"]
    assert cm["shared", "shared"] == 1 and cm["shared", "chat_only"] == 1
    assert cm["chat_only", "chat_only"] == 1 and cm["chat_only", "missed"] == 1
    assert cm["chat_only", "other"] == 0
    assert cm.counts.sum() == 5
    assert "missed" in cm.format()
    with pytest.raises(ValueError, match="predictions"):
        confusion_matrix(["shared"], ["shared", "chat_only"])


def test_shrunk_weaker_copies_lower_exclusive_precision_not_recall(data):
    """The L1 failure: a weaker copy shrinks to zero, and the latent is read as exclusive."""
    W, perm = oracle_decoder(data, noise=0.0)
    inverse = torch.argsort(perm)
    kinds = np.array(data.kinds)
    shrunk = W.clone()
    for p in np.flatnonzero(kinds == "shared_weaker"):
        i = inverse[p]
        weak_side = int(shrunk[i].norm(dim=-1).argmin())
        shrunk[i, weak_side] = 0.0
    match, labels, confusion, scores = score_decoder(shrunk, data, preset="minder")
    # Still matched (cos 1/sqrt(1.09) = 0.958 > 0.9), so it counts as found, and misread.
    assert match.frac_recovered == 1.0
    assert confusion["shared_weaker", "chat_only"] == 4
    assert confusion["shared_weaker", "base_only"] == 4
    assert scores["chat_only"].recall == 1.0 and scores["base_only"].recall == 1.0
    assert scores["chat_only"].precision == pytest.approx(6 / 10)
    assert scores["base_only"].precision == pytest.approx(6 / 10)


def test_unexplained_latents_count_as_false_discoveries(data):
    W, perm = oracle_decoder(data, noise=0.0)
    gen = torch.Generator().manual_seed(5)
    junk = torch.zeros(3, 2, SMALL.d_model)
    junk[:, 1] = torch.randn(3, SMALL.d_model, generator=gen)  # chat-only, matches nothing
    W = torch.cat([W, junk])
    match, labels, _, scores = score_decoder(W, data, preset="minder")
    assert list(labels[-3:]) == ["chat_only"] * 3
    assert scores["chat_only"].precision == pytest.approx(6 / 9)
    assert scores["chat_only"].recall == 1.0
    alive = np.ones(len(W), bool)
    alive[-3:] = False  # dead latents are not on anyone's list
    rescored = precision_recall(labels, match, data.categories, alive)
    assert rescored["chat_only"].precision == 1.0


def test_missing_feature_lowers_recall(data):
    W, perm = oracle_decoder(data, noise=0.0)
    inverse = torch.argsort(perm)
    first_chat = data.kinds.index("chat_only")
    W[inverse[first_chat]] = torch.randn(2, SMALL.d_model, generator=torch.Generator())
    match, labels, confusion, scores = score_decoder(W, data, preset="minder")
    assert confusion["chat_only", "missed"] == 1
    assert scores["chat_only"].recall == pytest.approx(5 / 6)
    assert not match.recovered_P[first_chat]


def test_precision_is_nan_when_nothing_has_the_label(data):
    V = data.directions_PSD
    shared_only = V[np.array(data.categories) == "shared"]
    match, labels, _, scores = score_decoder(shared_only, data, preset="anthropic")
    assert math.isnan(scores["chat_only"].precision) and scores["chat_only"].recall == 0.0
    assert scores["shared"].precision == 1.0


def test_format_table_mentions_every_activation(data):
    results = {}
    for name, W in {"exact": oracle_decoder(data)[0], "junk": torch.randn(60, 2, 32)}.items():
        match, labels, confusion, scores = score_decoder(W, data)
        alive = np.ones(len(W), bool)
        results[name] = ActivationResult(
            name, W, match, labels, alive, confusion, scores, [0.1, 0.2], 4.0, 1.0
        )
    settings = {
        "dict_size": 60,
        "k": 4,
        "steps": 1,
        "batch_size": 8,
        "lr": 1e-3,
        "l1_coeff": None,
        "method": "hungarian",
        "threshold": 0.9,
        "preset": "minder",
        "thresholds": PRESETS["minder"].to_dict(),
    }
    result = BenchmarkResult(SMALL, settings, results)
    text = format_benchmark_table(result)
    rows = {line.split()[0]: line.split() for line in text.splitlines() if line.strip()}
    assert float(rows["exact"][2]) == 1.0  # fraction recovered
    assert float(rows["junk"][2]) < 0.5
    assert rows["exact"][5] == "0.10/0.20"
    assert "shared_weaker" in text
    assert result.to_dict()["results"]["exact"]["scores"]["chat_only"]["recall"] == 1.0


def test_labels_of_oracle_follow_planted_kind(data):
    labels = classify_latents(data.directions_PSD, preset="kissane")
    assert list(labels) == [
        {"base_only": "base_only", "chat_only": "chat_only", "shared_weaker": "other"}.get(
            k, "shared"
        )
        for k in data.kinds
    ]


# -------------------------------------------------------------------- benchmark (trains)

TINY = PlantedConfig(
    d_model=16,
    n_shared=4,
    n_shared_rotated=2,
    n_shared_weaker=2,
    n_base_only=2,
    n_chat_only=2,
    fire_prob=0.1,
    n_tokens=3000,
)


def test_benchmark_runs_every_activation_end_to_end():
    activations = ("relu", "topk", "batchtopk", "jumprelu")
    result = run_planted_benchmark(
        TINY, activations, dict_size=24, k=2, steps=30, batch_size=128, eval_tokens=500
    )
    assert list(result.results) == list(activations)
    for r in result.results.values():
        assert r.W_dec_FSD.shape == (24, 2, 16)
        assert r.labels_F.shape == (24,) and r.alive_F.shape == (24,)
        assert len(r.match.latent_P) == TINY.n_features
        assert r.confusion.counts.sum() == TINY.n_features
        assert all(0 <= v < 10 for v in r.fvu_S) and r.l0 >= 0
    # The table and the JSON form cover every activation; settings are recorded.
    assert result.settings["eval_tokens"] == 500 and result.settings["k"] == 2
    text = format_benchmark_table(result)
    assert all(f"\n{a} " in text for a in activations)
    assert set(result.to_dict()["results"]) == set(activations)


@pytest.mark.slow  # 15-30 s on the shared 2-core CPU (one thread)
def test_batchtopk_recovers_and_labels_planted_features_at_defaults():
    """The acceptance numbers quoted in docs/synthetic.md (defaults, one seed)."""
    result = run_planted_benchmark(PlantedConfig(), ("batchtopk",), num_threads=1)
    r = result.results["batchtopk"]
    assert r.match.frac_recovered >= 0.9
    for category in ("chat_only", "base_only"):
        assert r.scores[category].recall >= 0.9, category
        assert r.scores[category].precision >= 0.9, category


def test_result_json_has_no_nan(data):
    V = data.directions_PSD
    W = V[np.array(data.categories) == "shared"]  # nothing is labelled exclusive
    match, labels, confusion, scores = score_decoder(W, data, preset="anthropic")
    r = ActivationResult(
        "x", W, match, labels, np.ones(len(W), bool), confusion, scores, [0.0, 0.0], 1.0, 0.0
    )
    assert r.to_dict()["scores"]["chat_only"]["precision"] is None
    json.dumps(r.to_dict(), allow_nan=False)
