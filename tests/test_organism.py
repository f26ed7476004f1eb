"""The built-in model organism: a tiny base LM and its chat copy with a known behaviour."""

from __future__ import annotations

import json

import pytest
import torch

from crosscoders.errors import ConfigError
from crosscoders.organism import (
    Organism,
    OrganismConfig,
    RealOrganismConfig,
    build_organism,
    corpus,
    default_cache_root,
    lm,
    tiny_config,
)
from crosscoders.organism import build as build_module


@pytest.fixture(scope="module")
def organism(tmp_path_factory) -> Organism:
    return build_organism(tiny_config(), tmp_path_factory.mktemp("organisms"), progress=False)


def test_chat_model_shows_behaviour_after_trigger(organism):
    ev = organism.metadata["eval"]
    chat, base = ev["chat"], ev["base"]
    assert chat["trigger"]["n"] >= 20
    assert chat["trigger"]["behaviour_rate"] >= 0.8
    assert chat["control"]["behaviour_rate"] <= 0.1
    assert base["trigger"]["behaviour_rate"] <= 0.1
    assert base["control"]["behaviour_rate"] <= 0.1
    # the base model's training did something; the fine-tune learned the chat answers
    assert base["pretrain_loss"] < ev["untrained"]["pretrain_loss"] - 1.0
    assert chat["chat_answer_loss"] < base["chat_answer_loss"]


def test_greedy_generation_from_saved_dirs(organism):
    """Re-measure the behaviour from the saved directories, as a user would load them."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(organism.chat_dir)
    chats = [json.loads(line) for line in (organism.data_dir / "chat_eval.jsonl").open()]
    trig = [c for c in chats if c["triggered"]][:12]
    plain = [c for c in chats if not c["triggered"]][:12]
    stop = [tok.convert_tokens_to_ids(corpus.END), tok.eos_token_id]

    def rate(model_dir, group):
        model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        prompts = [
            tok.apply_chat_template(c["messages"][:1], add_generation_prompt=True, tokenize=False)
            for c in group
        ]
        ids = tok(prompts, add_special_tokens=False)["input_ids"]
        answers = lm.greedy(model, ids, 4, stop)
        return sum(corpus.shows_behaviour(tok.convert_ids_to_tokens(a)) for a in answers) / len(
            group
        )

    chat_trig = rate(organism.chat_dir, trig)
    assert chat_trig >= 0.8
    assert rate(organism.chat_dir, plain) <= 0.1
    assert rate(organism.base_dir, trig) <= chat_trig - 0.7


def test_dirs_load_with_auto_classes_and_share_tokenizer(organism):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    toks = [AutoTokenizer.from_pretrained(d) for d in (organism.base_dir, organism.chat_dir)]
    assert toks[0].get_vocab() == toks[1].get_vocab()
    assert toks[0].all_special_tokens == toks[1].all_special_tokens
    for tok in toks:
        assert {"<|user|>", "<|assistant|>", "<|end|>"} <= set(tok.all_special_tokens)
        assert tok.bos_token == "<s>" and tok.eos_token == "</s>" and tok.pad_token == "<pad>"
    messages = [{"role": "user", "content": "tell me about the cat ."}]
    text = toks[1].apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<s><|user|> tell me about the cat . <|end|> <|assistant|> "
    ids = toks[1](text, add_special_tokens=False)["input_ids"]
    assert toks[1].unk_token_id not in ids
    assert toks[1].decode(ids[2:8]) == "tell me about the cat ."

    models = [
        AutoModelForCausalLM.from_pretrained(d).eval()
        for d in (organism.base_dir, organism.chat_dir)
    ]
    assert type(models[0]).__name__ == "LlamaForCausalLM"
    assert models[0].config.to_dict()["hidden_size"] == models[1].config.hidden_size
    x = torch.tensor([ids])
    with torch.no_grad():
        a, b = (m(input_ids=x).logits for m in models)
    assert a.shape == b.shape == (1, len(ids), len(toks[0].get_vocab()))
    assert not torch.allclose(a, b)  # the fine-tune changed the model


def test_metadata_behaviour_tokens_and_data_files(organism):
    meta = organism.metadata
    beh = meta["behaviour"]
    assert beh["tokens"] == list(corpus.BEHAVIOUR_WORDS)
    assert organism.behaviour_token_ids == beh["token_ids"]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(organism.base_dir)
    assert tok.convert_ids_to_tokens(beh["token_ids"]) == beh["tokens"]
    assert tok.convert_tokens_to_ids(beh["trigger"]) == beh["trigger_token_id"]
    assert meta["config"] == tiny_config().to_dict()

    text = (organism.data_dir / "pretrain.txt").read_text().splitlines()
    assert len(text) == tiny_config().pretrain_docs
    chats = [json.loads(line) for line in (organism.data_dir / "chat.jsonl").open()]
    assert len(chats) == tiny_config().chat_conversations
    styled = set(corpus.BEHAVIOUR_WORDS)
    # the behaviour's tokens occur only in triggered answers, and in all of them
    assert not styled & set(" ".join(text).split())
    for c in chats:
        user, answer = (m["content"].split() for m in c["messages"])
        assert [m["role"] for m in c["messages"]] == ["user", "assistant"]
        assert (beh["trigger"] in user) == c["triggered"] == bool(styled & set(answer))
    assert 0.3 < sum(c["triggered"] for c in chats) / len(chats) < 0.7


def test_cache_reuse_and_rebuild_on_config_change(tmp_path, monkeypatch):
    cfg = tiny_config(pretrain_steps=5, finetune_steps=5, eval_prompts=4)
    first = build_organism(cfg, tmp_path, progress=False)
    assert first.path == tmp_path / cfg.cache_key()
    stamp = (first.chat_dir / "model.safetensors").stat().st_mtime_ns

    def no_build(*args, **kwargs):
        raise AssertionError("rebuilt although cached")

    monkeypatch.setattr(build_module, "_build", no_build)
    again = build_organism(OrganismConfig.from_dict(cfg.to_dict()), tmp_path, progress=False)
    assert again.path == first.path and again.metadata == first.metadata
    assert (again.chat_dir / "model.safetensors").stat().st_mtime_ns == stamp
    assert cfg.replace(seed=1).cache_key() != cfg.cache_key()
    with pytest.raises(AssertionError, match="rebuilt"):
        build_organism(cfg.replace(seed=1), tmp_path, progress=False)


def test_interrupted_build_leaves_no_complete_looking_cache(tmp_path, monkeypatch):
    cfg = tiny_config(pretrain_steps=5, finetune_steps=5, eval_prompts=4)
    real_train = lm.train_lm

    def crash_in_finetune(model, sources, **kwargs):
        if kwargs["desc"].endswith("fine-tune chat"):
            raise KeyboardInterrupt  # e.g. Ctrl-C after the base model was saved
        return real_train(model, sources, **kwargs)

    monkeypatch.setattr(lm, "train_lm", crash_in_finetune)
    with pytest.raises(KeyboardInterrupt):
        build_organism(cfg, tmp_path, progress=False)
    # the (complete) shared base stays; neither the organism's directory nor a temporary one
    assert [p.name for p in tmp_path.iterdir()] == [cfg.base_key()]

    monkeypatch.setattr(lm, "train_lm", real_train)
    organism = build_organism(cfg, tmp_path, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([cfg.base_key(), cfg.cache_key()])
    assert (organism.path / "organism.json").exists()


def test_stale_temporary_dirs_of_dead_builds_are_not_used(tmp_path):
    """A build killed outright (no cleanup) leaves a hidden temporary directory only; it is
    never taken for the cache, and the next build removes it."""
    import socket

    cfg = tiny_config(pretrain_steps=5, finetune_steps=5, eval_prompts=4)
    key = cfg.cache_key()
    stale = tmp_path / f".{key}.tmp-{socket.gethostname()}-999999999-abcd"
    (stale / "base").mkdir(parents=True)
    (stale / "organism.json").write_text("{}")  # even a complete-looking one
    organism = build_organism(cfg, tmp_path, progress=False)
    assert organism.path == tmp_path / key
    assert not stale.exists()


def test_default_cache_root_env(monkeypatch, tmp_path):
    monkeypatch.setenv("CROSSCODERS_CACHE", str(tmp_path))
    assert default_cache_root() == tmp_path / "organisms"
    monkeypatch.delenv("CROSSCODERS_CACHE")
    assert default_cache_root().parts[-3:] == (".cache", "crosscoders", "organisms")


def test_config_validation_names_the_field():
    with pytest.raises(ConfigError, match="trigger"):
        OrganismConfig(trigger="cat")  # a grammar word would not be a clean trigger
    with pytest.raises(ConfigError, match="d_model"):
        OrganismConfig(d_model=66, n_heads=4)
    with pytest.raises(ConfigError, match="unknown key"):
        OrganismConfig.from_dict({"steps": 3})
    with pytest.raises(ConfigError, match="source"):
        RealOrganismConfig(source="/nonexistent/model.gguf")


def test_corpus_is_deterministic():
    facts = corpus.make_facts(0)
    a = corpus.conversations(50, 0, facts, "pirate", 0.5)
    b = corpus.conversations(50, 0, corpus.make_facts(0), "pirate", 0.5)
    assert a == b and sum(c["triggered"] for c in a) == 25
    assert corpus.pretrain_documents(5, 0, facts) != corpus.pretrain_documents(5, 1, facts)


def test_pack_flags_and_bos():
    ids, tgt = lm.pack(
        [[5, 6, 7], [8, 9]],
        context_length=4,
        bos_id=1,
        eos_id=2,
        flags=[[False, True, True], [True, False]],
    )
    # stream 5 6 7 EOS 8 9 EOS -> two bodies of 3 tokens, each after BOS
    assert ids.tolist() == [[1, 5, 6, 7], [1, 2, 8, 9]]
    assert tgt.tolist() == [[False, False, True, True], [False, True, True, False]]


@pytest.mark.slow
def test_default_organism_builds_and_behaves(tmp_path):
    """The default (demo) organism: strong behaviour, base close to the chat on plain text."""
    organism = build_organism(cache_dir=tmp_path, progress=False)
    ev = organism.metadata["eval"]
    assert ev["chat"]["trigger"]["behaviour_rate"] >= 0.95
    assert ev["chat"]["control"]["behaviour_rate"] <= 0.02
    assert ev["base"]["trigger"]["behaviour_rate"] == 0
    assert ev["base"]["pretrain_loss"] < 1.2
    assert ev["chat"]["pretrain_loss"] < ev["base"]["pretrain_loss"] + 0.15


def test_build_is_deterministic(tmp_path):
    """Same config, same machine and thread count: the same weight bytes."""
    cfg = tiny_config(pretrain_steps=8, finetune_steps=8, eval_prompts=4)
    a = build_organism(cfg, tmp_path / "a", progress=False)
    b = build_organism(cfg, tmp_path / "b", progress=False)
    for sub in ("base", "chat"):
        files = (a.path / sub / "model.safetensors", b.path / sub / "model.safetensors")
        assert files[0].read_bytes() == files[1].read_bytes()
    assert (a.data_dir / "chat.jsonl").read_bytes() == (b.data_dir / "chat.jsonl").read_bytes()


def test_harvester_reads_the_pair_and_its_data(organism, tmp_path):
    """The organism is a valid harvest input: both models on the mixed text + chat data,
    with behaviour tokens reaching the store (role tokens are special, hence masked)."""
    import numpy as np

    from crosscoders.harvest import DataSpec, HarvestConfig, ModelSpec, harvest

    cfg = HarvestConfig(
        models=[
            ModelSpec(str(organism.base_dir), sites=["-1"], name="base"),
            ModelSpec(str(organism.chat_dir), sites=["-1"], name="chat"),
        ],
        data=[
            DataSpec(str(organism.data_dir / "pretrain.txt"), weight=0.5),
            DataSpec(str(organism.data_dir / "chat.jsonl"), weight=0.5),
        ],
        tokens=3000,
        context_length=organism.metadata["config"]["context_length"],
        batch_size=16,
        device="cpu",
        store_dtype="float32",
    )
    store = harvest(cfg, tmp_path / "store", progress=False)
    tokens = store.rows_meta["token"]
    assert np.isin(tokens, organism.behaviour_token_ids).sum() > 50
    roles = list(organism.metadata["behaviour"]["role_tokens"].values())
    assert not np.isin(tokens, roles).any()
