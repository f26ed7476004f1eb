"""Max-activating examples: exact top-n against brute force, samples, context windows from a
tensor and from an activation store, SQLite round trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from crosscoders import Crosscoder, CrosscoderConfig
from crosscoders.diff.examples import (
    ExampleCollector,
    collect_examples,
    load_examples,
    save_examples,
)
from crosscoders.diff.stats import analysis_pass
from crosscoders.diff.table import latent_table
from crosscoders.store import ActivationStore, ShardMeta, StoreWriter
from crosscoders.store import format as fmt
from helpers import planted_acts

T = 10  # context length of the test store


def _model(F=24, D=16) -> Crosscoder:
    cfg = CrosscoderConfig(n_sources=2, d_model=D, dict_size=F, activation="relu", k=None)
    model = Crosscoder(cfg).eval()
    with torch.no_grad():
        model.b_enc.fill_(-0.3)
    return model


@pytest.fixture(scope="module")
def acts():
    return planted_acts(n=900, D=16, seed=5)[0]


def test_top_examples_are_exact_and_samples_fire(acts):
    model = _model()
    collector = ExampleCollector(model.dict_size, None, n_top=5, n_samples=4, buffer=64)
    analysis_pass(model, acts, [collector], batch_size=50, progress=False)
    recs = collector.records()
    with torch.no_grad():
        f = model.encode(acts)
    for latent in range(model.dict_size):
        col = f[:, latent]
        n_fire = int((col > 0).sum())
        top = [r for r in recs if r["latent"] == latent and r["kind"] == "top"]
        assert len(top) == min(5, n_fire)
        want = torch.sort(col, descending=True).values[: len(top)]
        np.testing.assert_allclose([r["value"] for r in top], want.numpy(), rtol=1e-6)
        for r in top:
            assert col[r["row"]].item() == pytest.approx(r["value"], rel=1e-6)
        samples = [r for r in recs if r["latent"] == latent and r["kind"] == "sample"]
        assert len(samples) == min(4, n_fire)
        assert len({r["row"] for r in samples}) == len(samples)
        for r in samples:
            assert col[r["row"]].item() == pytest.approx(r["value"], rel=1e-6) and r["value"] > 0
            assert 0 < r["quantile"] < 1
        values = [r["value"] for r in samples]
        assert values == sorted(values, reverse=True)


def test_samples_are_uniform_over_firings():
    """A latent firing on every row with value = row index: sampled rows look uniform."""
    model = _model(F=1, D=1)
    with torch.no_grad():
        model.W_enc_FSD.fill_(1.0)
        model.b_enc.zero_()
    x = torch.arange(1, 2001, dtype=torch.float32)[:, None, None].expand(-1, 2, 1) / 2
    rows = []
    for seed in range(30):
        c = ExampleCollector(1, None, n_top=0, n_samples=10, seed=seed, buffer=16)
        analysis_pass(model, x.contiguous(), [c], batch_size=128, progress=False)
        rows += [r["row"] for r in c.records()]
    assert len(set(rows)) > 250
    assert 850 < np.mean(rows) < 1150  # uniform over 0..1999 has mean 999.5


def test_windows_from_tensor_respect_documents(acts, tmp_path):
    model = _model()
    tokens = np.arange(len(acts)) + 1000
    docs = np.arange(len(acts)) // 7
    with torch.no_grad():
        f = model.encode(acts)
    a, b = sorted(torch.argsort((f > 0).sum(0), descending=True)[:2].tolist())
    recs = collect_examples(model, acts, latents=[a, b], n_top=3, n_samples=2, before=4,
                            after=2, token_ids=tokens, doc_ids=docs, progress=False)
    assert {r["latent"] for r in recs} == {a, b}
    for r in recs:
        row, c = r["row"], r["center"]
        assert r["tokens"][c] == row + 1000
        assert all(docs[t - 1000] == docs[row] for t in r["tokens"])
        assert len(r["tokens"]) <= 7
        window_rows = np.array(r["tokens"]) - 1000
        np.testing.assert_allclose(r["acts"], f[window_rows, r["latent"]].numpy(), rtol=1e-5)
        assert r["acts"][c] == pytest.approx(r["value"], rel=1e-5)
    path = save_examples(recs, tmp_path / "examples.db", {"model": "x"})
    back = load_examples(path, latent=b, kind="top")
    assert [b["rank"] for b in back] == [0, 1, 2]
    assert back[0]["tokens"] == [r for r in recs if r["latent"] == b and r["kind"] == "top"][0][
        "tokens"]
    low = load_examples(path, kind="sample", max_quantile=0.5)
    assert all(b["quantile"] <= 0.5 for b in low)


def write_store(path, data_NSD: np.ndarray, shard_rows=(300, 300, 300)) -> ActivationStore:
    """A store whose contexts hold T tokens with position 0 (BOS, id 1) not stored."""
    S, D = data_NSD.shape[1:]
    writer = StoreWriter(path, {"test": 1}, n_sources=S, d_model=D, dtype="float32")
    row, ctx = 0, 0
    for k, n in enumerate(shard_rows):
        n_ctx = n // (T - 1)
        n = n_ctx * (T - 1)
        rows = np.zeros(n, fmt.ROW_DTYPE)
        rows["context"] = ctx + np.repeat(np.arange(n_ctx), T - 1)
        rows["position"] = np.tile(np.arange(1, T), n_ctx)
        rows["token"] = 100 + rows["context"] * T + rows["position"]
        contexts = 100 + (ctx + np.arange(n_ctx))[:, None] * T + np.arange(T)[None, :]
        contexts[:, 0] = 1
        meta = ShardMeta(rows, contexts.astype(np.int32), ctx, ctx + n_ctx, {"bos": n_ctx})
        acts = {s: np.ascontiguousarray(data_NSD[row : row + n, s]) for s in range(S)}
        writer.commit(k, "m", acts, meta)
        row, ctx = row + n, ctx + n_ctx
    writer.end(len(shard_rows), row)
    writer.finalize({"sources": [{"name": f"m{s}", "model": f"m{s}", "site": "resid_out:1"}
                                 for s in range(S)], "eval_tokens": 0})
    return ActivationStore.open(path)


def test_store_windows_tokens_and_special_share(acts, tmp_path):
    store = write_store(tmp_path / "store", acts.numpy())
    ids, wrows, center = store.window(9 + 3, before=5, after=2)  # context 1, position 4
    np.testing.assert_array_equal(ids, [1, 111, 112, 113, 114, 115, 116])
    np.testing.assert_array_equal(wrows, [-1, 9, 10, 11, 12, 13, 14])
    assert center == 4
    ids, wrows, _ = store.window(9 * 33 + 8, before=2, after=3)  # last token of a context
    assert wrows[-1] == 9 * 33 + 8 and len(ids) == 3  # does not cross into the next context
    model = _model()
    recs = collect_examples(model, store, latents=[3], n_top=2, n_samples=0, before=3,
                            after=0, progress=False)
    for r in recs:
        assert r["tokens"][r["center"]] == int(store.tokens[r["row"]])
        assert r["acts"][r["center"]] == pytest.approx(r["value"], rel=1e-5)
    special = [int(t) for t in store.tokens[::5]]
    table = latent_table(model, store, special_ids=special, latent_scaling="none",
                         progress=False, batch_size=100)
    with torch.no_grad():
        f = model.encode(store.rows(0, store.n_tokens))
    is_special = torch.from_numpy(np.isin(store.tokens, special))
    fired = f > 0
    want = (fired[is_special].sum(0).double() / fired.sum(0).clamp_min(1)).numpy()
    got = table.df["special_share"].to_numpy()
    ok = fired.sum(0).numpy() > 0
    np.testing.assert_allclose(got[ok], want[ok], rtol=1e-9)
