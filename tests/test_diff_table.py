"""Latent table, activation statistics and Latent Scaling: against direct computations and
a hand-built crosscoder whose latents have known shrinkage / decoupling."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from crosscoders import Crosscoder, CrosscoderConfig
from crosscoders.diff.categories import classify_latents
from crosscoders.diff.latent_scaling import (
    LatentScalingAccumulator,
    TrulyExclusiveRule,
    latent_scaling,
    lstsq_beta,
)
from crosscoders.diff.stats import (
    ActivationStats,
    EncodedBatch,
    activation_stats,
    analysis_pass,
)
from crosscoders.diff.table import LatentTable, latent_table, normalised_decoder
from crosscoders.errors import ConfigError, DataError
from crosscoders.model.sparse import SparseCodes, sparse_decode
from helpers import planted_acts


def _model(activation="topk", k=4, F=32, D=16, seed=0) -> Crosscoder:
    cfg = CrosscoderConfig(n_sources=2, d_model=D, dict_size=F, activation=activation, k=k,
                           source_names=["base", "chat"], seed=seed)
    model = Crosscoder(cfg).double().eval()
    with torch.no_grad():
        model.b_enc.fill_(0.05)
        model.b_dec.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
        model.W_dec.mul_(torch.rand(F, 2, 1, generator=torch.Generator().manual_seed(2)) + 0.2)
    return model


@pytest.fixture(scope="module")
def acts():
    x, _ = planted_acts(n=700, D=16, seed=3)
    return x.double()


def test_sparse_decode_matches_dense(acts):
    model = _model()
    batch = EncodedBatch.encode(model, acts[:50])
    torch.testing.assert_close(batch.xhat_BSD, model.decode(batch.f_BF))
    no_index = torch.zeros(0, dtype=torch.long)
    none = SparseCodes(no_index, no_index, acts.new_zeros(0), 3, model.dict_size)
    empty = sparse_decode(none, model.W_dec, model.b_dec).view(3, 2, 16)
    torch.testing.assert_close(empty, model.b_dec.expand(3, 2, 16))


def test_activation_stats_match_dense_reference(acts):
    model = _model(activation="relu", k=None)
    tokens = np.arange(len(acts)) % 7
    per, summ = activation_stats(model, acts, token_ids=tokens, special_ids=[0, 3],
                                 batch_size=128, progress=False)
    with torch.no_grad():
        f = model.encode(acts)
        xhat = model.decode(f)
    fired = (f > 0).double()
    count = fired.sum(0)
    np.testing.assert_allclose(per["freq"], (count / len(acts)).numpy())
    mean = torch.where(count > 0, f.sum(0) / count.clamp_min(1), 0)
    np.testing.assert_allclose(per["mean_act"], mean.numpy(), rtol=1e-10)
    np.testing.assert_allclose(per["max_act"], f.max(0).values.numpy())
    special = torch.from_numpy(np.isin(tokens, [0, 3]))
    share = fired[special].sum(0) / count
    np.testing.assert_allclose(per["special_share"], share.numpy(), rtol=1e-10)
    for s in range(2):
        x = acts[:, s]
        fvu = (x - xhat[:, s]).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
        assert summ["fvu"][s] == pytest.approx(float(fvu), rel=1e-9)
    assert summ["l0"] == pytest.approx(float(fired.sum(1).mean()))
    assert summ["dead_fraction"] == pytest.approx(float((count == 0).double().mean()))


def test_latent_scaling_equals_least_squares(acts):
    model = _model()
    latents = [0, 3, 5, 17, 30]
    res = latent_scaling(model, acts, latents, ref=1, other=0, batch_size=97, progress=False)
    with torch.no_grad():
        f = model.encode(acts)
        xhat = model.decode(f)
    got = {"other_recon": res.beta_other_recon, "ref_recon": res.beta_ref_recon,
           "other_err": res.beta_other_err, "ref_err": res.beta_ref_err}
    checked = 0
    for j, i in enumerate(latents):
        if not (f[:, i] > 0).any():
            assert np.isnan(res.beta_ref_recon[j])
            continue
        d = model.W_dec[i, 1].detach()
        for m, name in ((0, "other"), (1, "ref")):
            recon = xhat[:, m]
            err = acts[:, m] - (recon - f[:, i, None] * model.W_dec[i, m].detach())
            assert got[f"{name}_recon"][j] == pytest.approx(lstsq_beta(f[:, i], recon, d), rel=1e-8)
            assert got[f"{name}_err"][j] == pytest.approx(lstsq_beta(f[:, i], err, d), rel=1e-8)
        checked += 1
    assert checked >= 3
    np.testing.assert_allclose(res.nu_r, res.beta_other_recon / res.beta_ref_recon)


def test_latent_scaling_is_in_normalised_units(acts):
    """A folded model on raw data gives the betas of the unfolded model on normalised data."""
    model = _model()
    folded = copy.deepcopy(model)
    scale = torch.tensor([3.0, 0.5], dtype=torch.float64)
    folded.fold_normalisation(scale)
    raw = acts / scale[None, :, None]
    a = latent_scaling(model, acts, range(32), progress=False)
    b = latent_scaling(folded, raw, range(32), progress=False)
    for name in ("beta_other_recon", "beta_ref_recon", "beta_other_err", "beta_ref_err"):
        np.testing.assert_allclose(getattr(a, name), getattr(b, name), rtol=1e-9)


def _hand_built() -> tuple[Crosscoder, torch.Tensor]:
    """Four concepts on orthogonal axes, each read by a ReLU latent from one source:

    latent 0: chat-only, truly (base never has the concept);
    latent 1: chat-only decoder, but the base has the concept at 0.5x (complete shrinkage);
    latent 2 (chat side) + latent 3 (base side): one shared concept split in two exclusive
    latents (latent decoupling);
    latent 4: shared.
    """
    D, N = 8, 400
    gen = torch.Generator().manual_seed(0)
    e = torch.eye(D, dtype=torch.float64)
    a = (torch.rand(N, 4, generator=gen, dtype=torch.float64) < 0.3) * (
        torch.rand(N, 4, generator=gen, dtype=torch.float64) + 0.5)
    x = torch.zeros(N, 2, D, dtype=torch.float64)
    x[:, 1] += a[:, 0, None] * e[0]
    x[:, 1] += a[:, 1, None] * e[1]
    x[:, 0] += 0.5 * a[:, 1, None] * e[1]
    x[:, :, :] += a[:, 2, None, None] * e[2]
    x[:, :, :] += a[:, 3, None, None] * e[3]
    cfg = CrosscoderConfig(n_sources=2, d_model=D, dict_size=5, activation="relu", k=None,
                           source_names=["base", "chat"])
    model = Crosscoder(cfg).double().eval()
    W_dec = torch.zeros(5, 2, D, dtype=torch.float64)
    W_enc = torch.zeros(5, 2, D, dtype=torch.float64)
    W_dec[0, 1], W_enc[0, 1] = e[0], e[0]
    W_dec[1, 1], W_enc[1, 1] = e[1], e[1]
    W_dec[2, 1], W_enc[2, 1] = e[2], e[2]
    W_dec[3, 0], W_enc[3, 0] = e[2], e[2]
    W_dec[4, 0] = W_dec[4, 1] = e[3]
    W_enc[4, 1] = e[3]
    with torch.no_grad():
        model.W_dec.copy_(W_dec)
        model.W_enc_FSD.copy_(W_enc)
        model.b_enc.zero_()
        model.b_dec.zero_()
    return model, x


def test_latent_scaling_flags_shrinkage_and_decoupling():
    model, x = _hand_built()
    res = latent_scaling(model, x, [0, 1, 2, 4], progress=False)
    np.testing.assert_allclose(res.nu_eps, [0.0, 0.5, 0.0, 1.0], atol=1e-12)
    np.testing.assert_allclose(res.nu_r, [0.0, 0.0, 1.0, 1.0], atol=1e-12)
    assert res.truly_exclusive().tolist() == [True, False, False, False]
    assert res.truly_exclusive(TrulyExclusiveRule(nu_r_max=2, nu_eps_max=0.6)).tolist() == [
        True, True, True, False]

    table = latent_table(model, x, preset="anthropic", progress=False, batch_size=64)
    df = table.df
    assert df["category"].tolist() == ["chat_only", "chat_only", "chat_only", "base_only",
                                      "shared"]
    assert df["truly_chat_only"].tolist() == [True, False, False, False, False]
    # latent 3 is base-only, scaled with the base decoder as reference: the chat side has
    # the concept in its reconstruction (latent 2), so it is decoupled, not truly base-only
    assert df.loc[3, "ls_ref"] == "base" and df.loc[3, "nu_r"] == pytest.approx(1.0)
    assert not df.loc[3, "truly_base_only"]
    assert table.summary["latent_scaling"]["n_truly_chat_only"] == 1
    assert table.summary["preset_counts"] == {"shared": 1, "base_only": 1, "chat_only": 3,
                                              "other": 0}
    # the graded view adds its categories to the counts; 5 latents are too few for a null
    assert table.summary["counts"] == {**table.summary["preset_counts"], "chat_leaning": 0,
                                       "base_leaning": 0, "rare": 0, "dead": 0}
    assert "no null fitted" in table.summary["graded"]["note"]
    assert table.summary["fvu"]["chat"] == pytest.approx(0.0, abs=1e-20)
    assert table.summary["fvu"]["base"] == pytest.approx(0.2 / 1.2, rel=0.2)  # 0.5x missed


def test_table_columns_files_and_presets(tmp_path, acts):
    model = _model()
    with torch.no_grad():
        model.fold_normalisation(torch.tensor([2.0, 1.0], dtype=torch.float64))
    weights_only = latent_table(model, preset="kissane")
    expected = classify_latents(normalised_decoder(model), 0, 1, preset="kissane")
    assert weights_only.df["category"].tolist() == expected.tolist()
    norms = model.decoder_norms().detach()
    np.testing.assert_allclose(weights_only.df["norm_base"], norms[:, 0].numpy())
    np.testing.assert_allclose(
        weights_only.df["rel_norm"], (norms[:, 1] / norms.sum(1)).numpy(), rtol=1e-12)
    table = latent_table(model, acts / torch.tensor([2.0, 1.0])[None, :, None],
                         base="base", chat="chat", latent_scaling="all", progress=False)
    for col in ("latent", "rel_norm", "category", "dec_cos", "enc_cos", "freq", "max_act",
                "nu_r", "nu_eps", "truly_chat_only"):
        assert col in table.df.columns
    table.save(tmp_path / "out")
    back = LatentTable.load(tmp_path / "out")
    assert back.df.shape == table.df.shape
    assert back.summary["l0"] == pytest.approx(table.summary["l0"])
    assert (tmp_path / "out" / "latents.csv").read_text().startswith("latent,")


def test_clear_errors(acts):
    model = _model()
    with pytest.raises(ConfigError, match="no source named"):
        latent_table(model, base="pretrained")
    with pytest.raises(ConfigError, match="different sources"):
        latent_table(model, base=1, chat="chat")
    with pytest.raises(ConfigError, match="unknown category preset"):
        latent_table(model, preset="nanda")
    with pytest.raises(DataError, match="sources of width"):
        latent_table(model, acts[:, :, :8], progress=False)
    with pytest.raises(ConfigError, match="duplicates"):
        LatentScalingAccumulator(model, [1, 1])
    with pytest.raises(DataError, match="no rows"):
        analysis_pass(model, acts, [ActivationStats(32, 2, 16)], start=5, stop=5)
