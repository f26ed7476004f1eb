"""Harvest: sites across architectures against output_hidden_states, the store it writes,
token handling and masks, and clear errors."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import threading

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from crosscoders.errors import ConfigError, CrosscodersError, DataError
from crosscoders.harvest import (
    DataSpec,
    HarvestConfig,
    ModelSpec,
    find_blocks,
    harvest,
    resolve_site,
)
from crosscoders.harvest.capture import SiteReader
from crosscoders.store import ActivationStore
from crosscoders.store import format as fmt
from crosscoders.testing import (
    FAMILIES,
    make_model,
    make_tokenizer,
    write_chat_corpus,
    write_text_corpus,
)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Two tiny Llama models (base, chat) sharing a tokenizer, and a text corpus."""
    root = tmp_path_factory.mktemp("pair")
    tok = make_tokenizer()
    make_model(root / "base", "llama", seed=0, tokenizer=tok)
    make_model(root / "chat", "llama", seed=1, tokenizer=tok)
    write_text_corpus(root / "text.jsonl", 200, seed=0)
    return root


def config(root, **changes) -> HarvestConfig:
    base = HarvestConfig(
        models=[
            ModelSpec(str(root / "base"), sites=["1", "resid_in:3"], name="base"),
            ModelSpec(str(root / "chat"), sites=["1", "resid_in:3"], name="chat"),
        ],
        data=[DataSpec(str(root / "text.jsonl"))],
        tokens=1500,
        context_length=24,
        batch_size=4,
        shard_tokens=500,
        store_dtype="float32",
        device="cpu",
        eval_tokens=0.1,
    )
    return dataclasses.replace(base, **changes)


def test_resolve_site_forms():
    assert resolve_site("0.5", 6).name == "resid_out:3"
    assert resolve_site(1.0, 6).name == "resid_out:5"
    assert resolve_site("-1", 6).name == "resid_out:5"
    assert resolve_site("resid_in:-2", 6).name == "resid_in:4"
    assert resolve_site("in:0", 6).last_block == -1
    with pytest.raises(ConfigError, match="layer 6 is out of range; the model has 6 blocks"):
        resolve_site("6", 6, "base")
    with pytest.raises(ConfigError, match="unknown kind 'mlp'"):
        resolve_site("mlp:3", 6)
    with pytest.raises(ConfigError, match="outside \\[0, 1\\]"):
        resolve_site("1.5", 6)


@pytest.mark.parametrize("family", FAMILIES)
def test_sites_match_output_hidden_states_and_stop_early(tmp_path, family):
    path = make_model(tmp_path / family, family, seed=0)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    _, blocks = find_blocks(model)
    assert len(blocks) == 4
    ids = torch.randint(7, 100, (2, 12))
    with torch.inference_mode():
        ref = model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
    calls: list[int] = []
    for i, block in enumerate(blocks):
        block.register_forward_hook(lambda *_, i=i: calls.append(i))
    model.lm_head.register_forward_hook(lambda *_: calls.append(-1))
    sites = [resolve_site(s, 4) for s in ("resid_in:0", "0", "resid_in:2", "0.5")]
    out = SiteReader(model, blocks, sites)(ids)
    # hidden_states[i] is the input of block i (the last entry is after the final norm).
    for got, index in zip(out, (0, 1, 2, 3), strict=True):
        torch.testing.assert_close(got, ref[index], rtol=0, atol=1e-6)
    assert calls == [0, 1, 2]  # blocks 3 and lm_head never ran


def test_last_block_output_is_pre_final_norm(tmp_path):
    path = make_model(tmp_path / "m", "llama")
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    _, blocks = find_blocks(model)
    ids = torch.randint(7, 100, (1, 9))
    (last,) = SiteReader(model, blocks, [resolve_site("-1", 4)])(ids)
    with torch.inference_mode():
        ref = model(input_ids=ids, output_hidden_states=True).hidden_states[-1]
        torch.testing.assert_close(model.model.norm(last), ref, rtol=0, atol=1e-6)


def _reference_rows(store: ActivationStore, root, batch_size: int) -> torch.Tensor:
    """Recompute every stored row with plain output_hidden_states forwards."""
    meta = store.rows_meta
    contexts = np.unique(meta["context"])
    models = {n: AutoModelForCausalLM.from_pretrained(root / n).eval() for n in ("base", "chat")}
    out = torch.empty(store.n_tokens, store.n_sources, store.d_model)
    for start in range(0, contexts.size, batch_size):
        group = contexts[start : start + batch_size]
        seqs = [store.context_tokens(int(c)) for c in group]
        width = max(len(s) for s in seqs)
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.from_numpy(s.astype(np.int64))
        for m, name in enumerate(("base", "chat")):
            with torch.inference_mode():
                hs = models[name](input_ids=ids, output_hidden_states=True).hidden_states
            for i, c in enumerate(group):
                rows = np.nonzero(meta["context"] == c)[0]
                pos = torch.from_numpy(meta["position"][rows].astype(np.int64))
                out[rows, 2 * m] = hs[2][i, pos]  # resid_out:1 = input of block 2
                out[rows, 2 * m + 1] = hs[3][i, pos]  # resid_in:3
    return out


def test_harvest_matches_reference_forward(pair, tmp_path):
    cfg = config(pair)
    store = harvest(cfg, tmp_path / "store", progress=False)
    assert store.n_tokens == 1500 and store.n_sources == 4 and store.d_model == 32
    assert [s["name"] for s in store.sources] == [
        "base/resid_out:1",
        "base/resid_in:3",
        "chat/resid_out:1",
        "chat/resid_in:3",
    ]
    assert len(store.shards) == 3
    torch.testing.assert_close(
        store.rows(0, 1500), _reference_rows(store, pair, 4), rtol=0, atol=1e-5
    )
    # Tokens are aligned with rows and with the stored contexts.
    for row in (0, 17, 999, 1499):
        info = store.locate(row)
        assert store.context_tokens(info["context"])[info["position"]] == store.tokens[row]
    # Stats gathered during the harvest match the data.
    train = store.rows(0, store.n_train).double()
    torch.testing.assert_close(
        store.mean_squared_norm().double(), (train**2).sum(-1).mean(0), rtol=1e-5, atol=0
    )
    assert store.manifest["models"][0]["fingerprint"] != store.manifest["models"][1]["fingerprint"]
    assert harvest(cfg, tmp_path / "store", progress=False).manifest_sha256 == store.manifest_sha256


def test_masks_bos_special_and_skip_first(pair, tmp_path):
    tok = make_tokenizer()
    store = harvest(config(pair, skip_first=3, eval_tokens=0), tmp_path / "s", progress=False)
    meta = store.rows_meta
    assert meta["position"].min() == 3
    special = set(tok.all_special_ids)
    assert not special & set(store.tokens.tolist())
    masked = store.manifest["masked"]
    n_contexts = int(meta["context"].max()) + 1
    assert masked["skip_first"] == 3 * n_contexts and masked["pad"] == 0
    assert masked["special"] > 0  # the EOS between packed documents
    # The contexts still hold the BOS the model saw.
    assert store.context_tokens(0)[0] == tok.bos_token_id


def test_doc_packing_and_chat_template(pair, tmp_path):
    write_chat_corpus(tmp_path / "chat.jsonl", 60, seed=2)
    cfg = config(
        pair,
        data=[DataSpec(str(tmp_path / "chat.jsonl"))],
        packing="doc",
        tokens=400,
        eval_tokens=0,
    )
    store = harvest(cfg, tmp_path / "s", progress=False)
    tok = make_tokenizer()
    first = json.loads((tmp_path / "chat.jsonl").read_text().splitlines()[0])["messages"]
    text = tok.apply_chat_template(first, tokenize=False)
    expected = tok(text, add_special_tokens=False)["input_ids"][: cfg.context_length]
    np.testing.assert_array_equal(store.context_tokens(0), expected)  # one BOS, from the policy
    meta = store.rows_meta
    assert (meta["doc"] == meta["context"]).all()  # one document per context
    assert store.manifest["masked"]["pad"] > 0
    template_ids = {tok.convert_tokens_to_ids(t) for t in ("<|user|>", "<|end|>")}
    assert not template_ids & set(store.tokens.tolist())


def test_mixture_follows_the_weights(pair, tmp_path):
    write_chat_corpus(tmp_path / "chat.jsonl", 400, seed=3)
    cfg = config(
        pair,
        data=[
            DataSpec(str(pair / "text.jsonl"), weight=3.0),
            DataSpec(str(tmp_path / "chat.jsonl"), weight=1.0),
        ],
        tokens=2000,
        eval_tokens=0,
    )
    store = harvest(cfg, tmp_path / "s", progress=False)
    share = float((store.rows_meta["dataset"] == 1).mean())
    assert 0.18 < share < 0.32


def test_sequential_mode_gives_the_same_store(pair, tmp_path):
    together = harvest(config(pair), tmp_path / "a", progress=False)
    apart = harvest(config(pair, sequential=True), tmp_path / "b", progress=False)
    assert torch.equal(together.rows(0, 1500), apart.rows(0, 1500))
    np.testing.assert_array_equal(together.rows_meta, apart.rows_meta)


def test_disk_full_leaves_no_complete_store_and_resumes(pair, tmp_path, monkeypatch):
    import errno

    from crosscoders.store import writer as writer_mod

    real = writer_mod._save_npy

    def failing(path, array):
        if path.parent.name != "00000":  # every file after the first shard's
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, array)

    monkeypatch.setattr(writer_mod, "_save_npy", failing)
    with pytest.raises(CrosscodersError, match="disk full while writing shard 1 .*run the same"):
        harvest(config(pair), tmp_path / "s", progress=False)
    assert _our_threads() == []  # the commit thread's error stopped the harvest and its threads
    assert not (tmp_path / "s" / "manifest.json").exists()
    with pytest.raises(DataError, match="incomplete"):
        ActivationStore.open(tmp_path / "s")
    monkeypatch.setattr(writer_mod, "_save_npy", real)
    resumed = harvest(config(pair), tmp_path / "s", progress=False)
    fresh = harvest(config(pair), tmp_path / "fresh", progress=False)
    assert torch.equal(resumed.rows(0, 1500), fresh.rows(0, 1500))


def _our_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("crosscoders-")]


@pytest.mark.parametrize("device,stats_on_device", [
    ("cpu", None),
    ("cpu", True),  # the accelerator path (statistics summed batch by batch), run on CPU
    pytest.param("cuda", None, marks=[pytest.mark.cuda, pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs CUDA")]),
])
def test_background_writer_gives_the_synchronous_store(
    pair, tmp_path, monkeypatch, device, stats_on_device
):
    """Tokenising thread, async copies and background commits write the very bytes of the
    all-on-the-main-thread path; the files are np.save's bytes, the checksums those of the
    files, the statistics the float64 sums of the stored values."""
    from crosscoders.harvest import loop
    from crosscoders.store.writer import shard_stats

    monkeypatch.setattr(loop, "STATS_ON_DEVICE", stats_on_device)
    cfg = config(pair, store_dtype="bfloat16", shard_tokens=100, device=device,
                 dtype="bfloat16" if device == "cuda" else "float32")
    background = harvest(cfg, tmp_path / "a", progress=False)
    assert _our_threads() == []  # the harvest stopped its threads
    with monkeypatch.context() as inline_path:
        inline_path.setattr(loop, "WRITE_AHEAD", 0)
        inline_path.setattr(loop, "PREFETCH_BATCHES", 0)
        inline = harvest(cfg, tmp_path / "b", progress=False)
    assert len(background.shards) > loop.WRITE_AHEAD + 2  # host buffers were reused
    names = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.npy"))
    assert names == sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*.npy"))
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert background.manifest == inline.manifest
    if device == "cpu":  # the bf16 bytes are the float32 activations cast as before
        wide = harvest(dataclasses.replace(cfg, store_dtype="float32"), tmp_path / "c",
                       progress=False)
        expected = fmt.to_storage(torch.from_numpy(wide.read(0, 1500)), "bfloat16")
        np.testing.assert_array_equal(background.read(0, 1500), expected)
    for shard in background.manifest["shards"]:
        directory = tmp_path / "a" / "shards" / f"{shard['index']:05d}"
        for name, info in shard["files"].items():
            raw = (directory / name).read_bytes()
            assert (hashlib.sha256(raw).hexdigest(), len(raw)) == (info["sha256"], info["bytes"])
            again = io.BytesIO()
            np.save(again, np.load(directory / name), allow_pickle=False)
            assert again.getvalue() == raw, name
        for s in range(4):
            acts = np.load(directory / f"acts_{s}.npy")
            stats, expected = np.load(directory / f"stats_{s}.npy"), shard_stats(acts, "bfloat16")
            if device == "cpu" and stats_on_device is None:
                np.testing.assert_array_equal(stats, expected)  # by the write threads
            else:
                scale = float(np.abs(fmt.to_float32_numpy(acts, "bfloat16")).sum())
                np.testing.assert_allclose(stats, expected, rtol=0, atol=1e-13 * scale)


def test_errors_are_clear(pair, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no retries
    with pytest.raises(ConfigError, match="layer 9 is out of range; the model has 4 blocks"):
        harvest(config(pair, models=[ModelSpec(str(pair / "base"), sites=["9"])]), tmp_path / "a")
    with pytest.raises(ConfigError, match="model path .*missing does not exist"):
        harvest(config(pair, models=[ModelSpec(str(tmp_path / "missing"))]), tmp_path / "b")
    with pytest.raises(ConfigError, match="cannot load the config of model 'nobody/no-such-model'"):
        harvest(config(pair, models=[ModelSpec("nobody/no-such-model")]), tmp_path / "c")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="empty.jsonl yielded no documents"):
        harvest(config(pair, data=[DataSpec(str(tmp_path / "empty.jsonl"))]), tmp_path / "d")
    (tmp_path / "x.jsonl").write_text('{"body": "the cat"}\n')
    with pytest.raises(DataError, match="no field 'text' .fields: body.; set text_field"):
        harvest(config(pair, data=[DataSpec(str(tmp_path / "x.jsonl"))]), tmp_path / "e")
    harvest(config(pair, tokens=300), tmp_path / "f", progress=False)
    with pytest.raises(ConfigError, match="harvested with another config"):
        harvest(config(pair, tokens=400), tmp_path / "f", progress=False)


def test_mismatched_tokenizers_name_the_tokens(pair, tmp_path):
    other = make_tokenizer(extra_words=("zebra",))
    make_model(tmp_path / "odd", "llama", tokenizer=other)
    cfg = config(
        pair,
        models=[
            ModelSpec(str(pair / "base"), name="base"),
            ModelSpec(str(tmp_path / "odd"), name="odd"),
        ],
    )
    with pytest.raises(ConfigError, match="tokenizers of base and odd differ .*'zebra': None vs"):
        harvest(cfg, tmp_path / "s", progress=False)


def test_different_d_model_is_refused(pair, tmp_path):
    make_model(tmp_path / "wide", "llama", d_model=64)
    cfg = config(
        pair,
        models=[
            ModelSpec(str(pair / "base"), name="base"),
            ModelSpec(str(tmp_path / "wide"), name="wide"),
        ],
    )
    with pytest.raises(ConfigError, match="different d_model .*32.*64.*needs one d_model"):
        harvest(cfg, tmp_path / "s", progress=False)


def test_text_inputs_txt_parquet_and_saved_datasets(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    from crosscoders.harvest.text import read_documents

    docs = ["the cat runs", "a dog sings\nand reads", "hello"]
    (tmp_path / "a.txt").write_text("\n\n".join(docs) + "\n")
    para = [
        d.text for d in read_documents(DataSpec(str(tmp_path / "a.txt"), txt_split="paragraph"))
    ]
    assert para == docs
    lines = [d.text for d in read_documents(DataSpec(str(tmp_path / "a.txt")))]
    assert lines == ["the cat runs", "a dog sings", "and reads", "hello"]
    pq.write_table(pa.table({"body": docs, "id": [1, 2, 3]}), tmp_path / "a.parquet")
    spec = DataSpec(str(tmp_path / "a.parquet"), text_field="body", max_docs=2)
    assert [d.text for d in read_documents(spec)] == docs[:2]
    datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(tmp_path / "saved"))
    assert [d.text for d in read_documents(DataSpec(str(tmp_path / "saved")))] == docs
    with pytest.raises(ConfigError, match="data file .*nope.jsonl does not exist"):
        list(read_documents(DataSpec(str(tmp_path / "nope.jsonl"))))
