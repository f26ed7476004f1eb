"""Causal checks, steering and the activation-difference lens on tiny local models.

An exact crosscoder (latent (s, d, +/-) reads +/-x[s, d] and writes it back) makes the
expected answers exact: splicing it changes nothing, and patching all latents turns the
base activation into the chat one."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from crosscoders import Crosscoder, CrosscoderConfig
from crosscoders.diff.causal import (
    SourceSite,
    default_keep,
    first_kept,
    patch_test,
    read_sources,
    replace_at_site,
    sources_from_manifest,
    splice_metrics,
)
from crosscoders.diff.lens import activation_difference, final_norm, lens_tokens
from crosscoders.diff.steering import steer
from crosscoders.errors import ConfigError, DataError
from crosscoders.harvest.sites import Site
from crosscoders.testing import make_model, make_tokenizer

D = 32


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    tok = make_tokenizer()
    models = {}
    for name, seed in (("base", 0), ("chat", 1)):
        make_model(root / name, "llama", seed=seed, tokenizer=tok, d_model=D, n_layers=3)
        models[name] = AutoModelForCausalLM.from_pretrained(root / name).eval()
    return models, tok


def exact_crosscoder(S: int = 2) -> Crosscoder:
    F = 2 * S * D
    cfg = CrosscoderConfig(n_sources=S, d_model=D, dict_size=F, activation="relu", k=None)
    cc = Crosscoder(cfg).eval()
    W = torch.zeros(F, S, D)
    i = 0
    for s in range(S):
        for d in range(D):
            for sign in (1.0, -1.0):
                W[i, s, d] = sign
                i += 1
    with torch.no_grad():
        cc.W_dec.copy_(W)
        cc.W_enc_FSD.copy_(W)
        cc.b_enc.zero_()
        cc.b_dec.zero_()
    return cc


SOURCES = [SourceSite("base", Site("resid_out", 1)), SourceSite("chat", Site("resid_out", 1))]


def _ids(tok, n=3, T=12, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, len(tok.get_vocab()), (n, T), generator=gen)
    ids[:, 0] = tok.bos_token_id
    return ids


def test_read_sources_and_identity_replacement(pair):
    models, tok = pair
    ids = _ids(tok)
    x = read_sources(models, SOURCES, ids)
    assert x.shape == (3, 12, 2, D)
    with torch.no_grad():
        hs = models["chat"](input_ids=ids, output_hidden_states=True).hidden_states
        torch.testing.assert_close(x[:, :, 1], hs[2])  # output of block 1
        clean = models["chat"](input_ids=ids).logits
        with replace_at_site(models["chat"], Site("resid_in", 2), lambda h: h.clone()):
            same = models["chat"](input_ids=ids).logits
        with replace_at_site(models["chat"], Site("resid_out", 1), lambda h: 0 * h):
            other = models["chat"](input_ids=ids).logits
    torch.testing.assert_close(clean, same)
    assert not torch.allclose(clean, other)


def test_splice_exact_crosscoder_recovers_everything(pair):
    models, tok = pair
    ids = _ids(tok)
    keep = default_keep(ids, exclude_ids=[tok.bos_token_id])
    assert not keep[:, 0].any() and keep[:, 1:].all()
    res = splice_metrics(exact_crosscoder(), models, SOURCES, ids, keep)
    for s in (0, 1):
        r = res[s]
        assert r["ce_spliced"] == pytest.approx(r["ce_clean"], abs=1e-4)
        assert r["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-3)
        assert r["kl_spliced"] == pytest.approx(0.0, abs=1e-5)
        assert r["kl_zero_ablation"] > 1e-3
    # a crosscoder with no latents reconstructs only b_dec = 0: as bad as zero-ablation
    empty = exact_crosscoder()
    with torch.no_grad():
        empty.W_dec.zero_()
    r = splice_metrics(empty, models, SOURCES, ids, keep, which=[1])[1]
    assert r["ce_loss_recovered"] == pytest.approx(0.0, abs=1e-4)


def test_patch_test_brackets(pair):
    models, tok = pair
    ids = _ids(tok, n=4)
    keep = default_keep(ids, exclude_ids=[tok.bos_token_id])
    cc = exact_crosscoder()
    chat_latents = np.arange(2 * D, 4 * D)  # they write x_chat into the chat source only
    base_latents = np.arange(0, 2 * D)  # they write x_base into the base source only
    res = patch_test(cc, models, SOURCES, ids, {"chat": chat_latents, "base": base_latents},
                     keep_BT=keep, first_n=2)
    assert res["all"]["kl_all"] == pytest.approx(0.0, abs=1e-5)
    assert res["none"]["kl_all"] > 1e-3
    assert res["base"]["n_latents"] == 2 * D
    # base latents subtract x_base: the chat model sees 0 + ... so KL differs from "none"
    assert res["base"]["kl_all"] != pytest.approx(res["none"]["kl_all"])
    assert res["chat"]["kl_first"] >= 0
    with pytest.raises(ConfigError, match="same site"):
        patch_test(cc, models, [SOURCES[0], SourceSite("chat", Site("resid_out", 2))], ids, {})


def test_first_kept():
    keep = torch.tensor([[False, True, True, True], [False, False, True, True]])
    assert first_kept(keep, 2).tolist() == [[False, True, True, False],
                                            [False, False, True, True]]


def test_sources_from_manifest():
    got = sources_from_manifest([{"name": "b/resid_out:1", "model": "b", "kind": "resid_out",
                                  "layer": 1}])
    assert got == [SourceSite("b", Site("resid_out", 1))]
    with pytest.raises(DataError, match="model and site"):
        sources_from_manifest([{"name": "src0"}])


def test_steering_zero_scale_is_plain_generation(pair):
    models, tok = pair
    model = models["chat"]
    cc = exact_crosscoder()
    prompt = "the cat runs"
    out = steer(model, tok, cc, latent=2 * D + 4, source=1, site=SOURCES[1],
                prompts=prompt, scales=[0.0, 50.0], max_new_tokens=6)
    ids = tok(prompt, return_tensors="pt").input_ids
    plain = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                           do_sample=False, pad_token_id=tok.pad_token_id)
    assert out[0]["token_ids"] == plain[0, ids.shape[1]:].tolist()
    assert out[1]["token_ids"] != out[0]["token_ids"]
    assert isinstance(out[1]["text"], str)


def test_activation_difference_lens(pair):
    models, tok = pair
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(50, 2, D, generator=gen)
    pos = np.arange(50) % 10
    res = activation_difference(x, n_positions=3, positions=pos, batch_size=7, progress=False)
    sel = pos < 3
    want = (x[sel, 1] - x[sel, 0]).double().mean(0)
    torch.testing.assert_close(res["delta_D"].double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(res["delta_PD"][1].double(), (x[pos == 1, 1] - x[pos == 1, 0])
                               .double().mean(0), rtol=1e-5, atol=1e-6)
    assert res["count_P"].tolist() == [5, 5, 5]
    model = models["chat"]
    out = lens_tokens(res["delta_D"], model, tok, top=5)
    with torch.no_grad():
        logits = model.lm_head(final_norm(model)(res["delta_D"][None]))[0]
    assert [o["token_id"] for o in out["promoted"]] == logits.topk(5).indices.tolist()
    assert [o["token_id"] for o in out["suppressed"]] == (-logits).topk(5).indices.tolist()
    assert out["promoted"][0]["token"] == tok.convert_ids_to_tokens(out["promoted"][0][
        "token_id"])
    with pytest.raises(DataError, match="no rows"):
        activation_difference(x, n_positions=3, positions=pos + 5, progress=False)


def test_after_marker_marks_the_first_tokens_of_each_response():
    import torch

    from crosscoders.diff.causal import after_marker

    ids = torch.tensor([[1, 9, 5, 5, 5, 9, 5, 5], [1, 5, 5, 5, 5, 5, 5, 9]])
    mask = after_marker(ids, marker_id=9, n=2)
    assert mask.tolist() == [[False, False, True, True, False, False, True, True],
                             [False] * 8]
