import numpy as np
import pytest
import torch

from crosscoders.diff.categories import (
    PRESETS,
    CategoryThresholds,
    category_score,
    classify_latents,
    decoder_cosine,
    decoder_norms,
    get_thresholds,
    minder_norm_diff,
    relative_norm,
)
from crosscoders.errors import ConfigError


def decoder_with_norms(n_base, n_chat, D=5, seed=0):
    """[F, 2, D] decoder whose per-source norms are exactly the given values."""
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(len(n_base), 2, D, generator=gen, dtype=torch.float64)
    W = W / W.norm(dim=-1, keepdim=True)
    norms = torch.stack([torch.as_tensor(n_base), torch.as_tensor(n_chat)], 1).double()
    return W * norms[:, :, None]


def test_decoder_norms_are_per_source_l2_norms():
    W = torch.zeros(2, 3, 4)
    W[0, 0, :2] = torch.tensor([3.0, 4.0])
    W[1, 2, 3] = -2.0
    expected = torch.tensor([[5.0, 0.0, 0.0], [0.0, 0.0, 2.0]])
    torch.testing.assert_close(decoder_norms(W), expected)


def test_relative_norm_and_minder_known_values():
    W = decoder_with_norms([1.0, 0.0, 1.0, 0.3, 1.0, 0.0], [0.0, 1.0, 1.0, 1.0, 0.3, 0.0])
    torch.testing.assert_close(
        relative_norm(W), torch.tensor([0.0, 1.0, 0.5, 1 / 1.3, 0.3 / 1.3, 0.5]).double()
    )
    # With q = weak / strong: dnorm = 1 - q / 2 on the chat-strong side, q / 2 on the other.
    torch.testing.assert_close(
        minder_norm_diff(W), torch.tensor([0.0, 1.0, 0.5, 0.85, 0.15, 0.5]).double()
    )


def test_scores_are_flipped_by_swapping_sources_and_scale_free():
    gen = torch.Generator().manual_seed(1)
    W = torch.randn(50, 2, 8, generator=gen) * torch.rand(50, 2, 1, generator=gen)
    for fn in (relative_norm, minder_norm_diff):
        torch.testing.assert_close(fn(W, base=1, chat=0), 1 - fn(W))
        torch.testing.assert_close(fn(7.0 * W), fn(W))
        assert ((fn(W) >= 0) & (fn(W) <= 1)).all()


def test_minder_is_the_published_formula_reoriented():
    W = decoder_with_norms([0.2, 1.0, 0.7, 3.0], [1.0, 0.4, 0.7, 0.1])
    n = decoder_norms(W)
    n_base, n_chat = n[:, 0], n[:, 1]
    published = ((n_base - n_chat) / torch.maximum(n_base, n_chat) + 1) / 2  # 0 = chat-only
    torch.testing.assert_close(minder_norm_diff(W), 1 - published)


def test_zero_norms_give_no_nan():
    W = torch.zeros(3, 2, 4)
    W[1, 1, 0] = 1e-12  # tiny but non-zero: still chat-only
    assert not relative_norm(W).isnan().any()
    assert not minder_norm_diff(W).isnan().any()
    assert not decoder_cosine(W).isnan().any()
    assert relative_norm(W)[0] == 0.5 and minder_norm_diff(W)[0] == 0.5
    assert relative_norm(W)[1] == 1.0 and minder_norm_diff(W)[1] == 1.0
    assert classify_latents(W, preset="minder")[0] == "shared"


def test_source_indices_select_and_are_checked():
    W = torch.zeros(1, 3, 2)
    W[0, 0, 0], W[0, 2, 0] = 1.0, 3.0  # source 1 empty
    assert relative_norm(W, base=0, chat=2).item() == pytest.approx(0.75)
    assert relative_norm(W, base=0, chat=1).item() == 0.0
    with pytest.raises(ValueError, match="not a source index"):
        relative_norm(W, base=0, chat=3)
    with pytest.raises(ValueError, match="different sources"):
        minder_norm_diff(W, base=1, chat=1)
    with pytest.raises(ValueError, match=r"\[F, S, D\]"):
        relative_norm(torch.zeros(4, 2))


def test_decoder_cosine():
    W = torch.zeros(4, 2, 3)
    W[0, 0, 0], W[0, 1, 0] = 1.0, 5.0  # same direction
    W[1, 0, 0], W[1, 1, 1] = 1.0, 1.0  # orthogonal
    W[2, 0, 0], W[2, 1, 0] = 1.0, -2.0  # opposite
    W[3, 0, 0] = 1.0  # chat decoder zero
    torch.testing.assert_close(decoder_cosine(W), torch.tensor([1.0, 0.0, -1.0, 0.0]))


R_GRID = [0.0, 0.04, 0.06, 0.09, 0.2, 0.35, 0.5, 0.65, 0.8, 0.92, 0.96, 1.0]


def labels_at_rel_norm(r_values, preset):
    r = torch.tensor(r_values, dtype=torch.float64)
    return list(classify_latents(decoder_with_norms(1 - r, r), preset=preset))


def test_anthropic_preset_has_no_other():
    labels = labels_at_rel_norm(R_GRID, "anthropic")
    assert labels == ["base_only", "base_only"] + ["shared"] * 8 + ["chat_only"] * 2


def test_kissane_preset():
    labels = labels_at_rel_norm(R_GRID, "kissane")
    expected = ["base_only"] * 4 + ["other", "shared", "shared", "shared", "other"]
    assert labels == expected + ["chat_only"] * 3


def test_minder_preset_on_dnorm():
    # dnorm values hit directly: n_chat = 1, n_base = q  =>  dnorm = 1 - q / 2.
    dnorm = [0.55, 0.6, 0.62, 0.85, 0.91]
    q = torch.tensor([2 * (1 - d) for d in dnorm], dtype=torch.float64)
    W = decoder_with_norms(q, torch.ones_like(q))
    torch.testing.assert_close(minder_norm_diff(W), torch.tensor(dnorm).double())
    assert list(classify_latents(W, preset="minder")) == [
        "shared",
        "shared",
        "other",
        "other",
        "chat_only",
    ]
    assert list(classify_latents(decoder_with_norms(torch.ones_like(q), q))) == [
        "shared",
        "shared",
        "other",
        "other",
        "base_only",
    ]


def test_same_ratio_differs_between_conventions():
    # A 0.3x weaker base copy: shared for Anthropic, "other" for Kissane and Minder.
    W = decoder_with_norms([0.3], [1.0])
    assert classify_latents(W, preset="anthropic")[0] == "shared"
    assert classify_latents(W, preset="kissane")[0] == "other"
    assert classify_latents(W, preset="minder")[0] == "other"


def test_custom_thresholds_and_validation():
    custom = CategoryThresholds("minder", 0.2, 0.8, 0.45, 0.55)
    W = decoder_with_norms([0.5, 1.0], [1.0, 1.0])  # dnorm 0.75, 0.5
    assert list(classify_latents(W, preset=custom)) == ["other", "shared"]
    assert CategoryThresholds.from_dict(custom.to_dict()) == custom
    torch.testing.assert_close(category_score(W, convention="minder"), minder_norm_diff(W))
    with pytest.raises(ConfigError, match="shared_low"):
        CategoryThresholds("rel_norm", 0.3, 0.9, 0.2, 0.7)
    with pytest.raises(ConfigError, match="chat_only_above"):
        CategoryThresholds("rel_norm", 0.1, 0.6, 0.3, 0.7)
    with pytest.raises(ConfigError, match=r"\[0, 1\]"):
        CategoryThresholds("rel_norm", -0.1, 0.9, 0.3, 0.7)
    with pytest.raises(ConfigError, match="convention"):
        CategoryThresholds.from_dict({"convention": "ratio"})


def test_presets_resolve_and_unknown_names_fail():
    assert get_thresholds("minder") is PRESETS["minder"]
    assert PRESETS["minder"].convention == "minder"
    assert PRESETS["anthropic"].convention == PRESETS["kissane"].convention == "rel_norm"
    with pytest.raises(ConfigError, match="anthropic"):
        classify_latents(torch.ones(2, 2, 3), preset="anthropics")


def test_classify_returns_one_string_per_latent():
    labels = classify_latents(np.ones((7, 2, 3), dtype=np.float32))
    assert labels.shape == (7,) and labels.dtype.kind == "U"
    assert set(labels) == {"shared"}
