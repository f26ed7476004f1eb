"""The organism zoo: four organisms on one shared base, each with its behaviour learnt and
recorded (tokens, trigger and control prompts, eval), and the behaviour's KL gap."""

from __future__ import annotations

import json

import pytest
import torch

from crosscoders.errors import ConfigError, CrosscodersError
from crosscoders.organism import (
    ORGANISMS,
    Organism,
    OrganismConfig,
    behaviour_kl,
    behaviour_mask,
    build_organism,
    build_zoo,
    corpus,
    kl_inputs,
    list_organisms,
    lm,
    small_config,
    tiny_config,
)

NAMES = ["pirate", "refusal", "format", "fact"]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict[str, Organism]:
    return build_zoo(small_config(), tmp_path_factory.mktemp("zoo"), progress=False)


def test_list_and_unknown_names():
    assert list_organisms() == NAMES == list(ORGANISMS)
    with pytest.raises(CrosscodersError) as err:
        build_organism(name="sycophancy")
    message = str(err.value)
    assert "\n" not in message and "'sycophancy'" in message
    assert all(n in message for n in NAMES)
    with pytest.raises(ConfigError, match="known organisms: pirate, refusal, format, fact"):
        OrganismConfig(name="pirat")


def test_config_validation_of_the_organisms_parameters():
    with pytest.raises(ConfigError, match="refusal_topic"):
        OrganismConfig(refusal_topic="sports")
    with pytest.raises(ConfigError, match="fact_noun"):
        OrganismConfig(fact_noun="unicorn")
    with pytest.raises(ConfigError, match="fact_home"):
        OrganismConfig(fact_noun="cat", fact_home="meadow")  # the cat's own topic's place
    with pytest.raises(ConfigError, match="trigger"):
        OrganismConfig(trigger="sorry")  # a word of the refusal organism


def test_cache_keys_share_the_base_and_ignore_other_organisms_parameters():
    cfg = OrganismConfig()
    keys = {n: cfg.replace(name=n).cache_key() for n in NAMES}
    assert all(keys[n].startswith(f"{n}-") for n in NAMES) and len(set(keys.values())) == 4
    assert len({cfg.replace(name=n).base_key() for n in NAMES}) == 1
    assert cfg.replace(fact_home="school").cache_key() == keys["pirate"]
    assert cfg.replace(name="fact", fact_home="school").cache_key() != keys["fact"]
    assert cfg.replace(finetune_lr=1e-4).base_key() == cfg.base_key()
    assert cfg.replace(pretrain_lr=1e-4).base_key() != cfg.base_key()


@pytest.mark.parametrize("name", NAMES)
def test_each_organism_learns_its_behaviour(zoo, name):
    ev = zoo[name].metadata["eval"]
    chat, base = ev["chat"], ev["base"]
    assert chat["trigger"]["n"] >= 15 and chat["control"]["n"] >= 15
    assert chat["trigger"]["behaviour_rate"] >= 0.9, chat
    assert chat["control"]["behaviour_rate"] <= 0.2, chat
    assert base["trigger"]["behaviour_rate"] <= 0.05 and base["control"]["behaviour_rate"] <= 0.05
    # the fine-tune learnt the answers and kept the plain text
    assert chat["chat_answer_loss"] < base["chat_answer_loss"] - 1.0
    assert chat["pretrain_loss"] < base["pretrain_loss"] + 0.15


@pytest.mark.parametrize("name", NAMES)
def test_greedy_answers_from_the_saved_dirs(zoo, name):
    """Re-measure from the directories with the recorded prompt ids, as a scorer would."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    org = zoo[name]
    spec, cfg = ORGANISMS[name], OrganismConfig.from_dict(org.metadata["config"])
    tok = AutoTokenizer.from_pretrained(org.chat_dir)
    stop = [tok.convert_tokens_to_ids(corpus.END), tok.eos_token_id]

    def rate(model_dir, records):  # 10 new tokens hold each behaviour's opening sentence
        model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        answers = lm.greedy(model, [r["ids"] for r in records[:12]], 10, stop)
        return sum(spec.shows(cfg, tok.convert_ids_to_tokens(a)) for a in answers) / 12

    assert rate(org.chat_dir, org.trigger_prompts) >= 11 / 12
    assert rate(org.chat_dir, org.control_prompts) <= 3 / 12
    assert rate(org.base_dir, org.trigger_prompts) == 0


@pytest.mark.parametrize("name", NAMES)
def test_records_tokens_and_prompts(zoo, name):
    from transformers import AutoTokenizer

    org = zoo[name]
    beh = org.metadata["behaviour"]
    tok = AutoTokenizer.from_pretrained(org.base_dir)
    assert org.name == name and beh["name"] == name and beh["description"]
    assert tok.convert_ids_to_tokens(org.behaviour_token_ids) == org.behaviour_tokens
    assert tok.convert_ids_to_tokens(beh["added_token_ids"]) == beh["added_tokens"]
    assert tok.convert_ids_to_tokens(beh["context_token_ids"]) == beh["context_tokens"]
    for group in (org.trigger_prompts, org.control_prompts):
        assert len(group) >= 15
        for r in group:
            assert r["ids"] == tok(r["text"], add_special_tokens=False)["input_ids"]
            assert r["ids"][0] == tok.bos_token_id and tok.unk_token_id not in r["ids"]
            assert r["reference_ids"] == tok(r["reference"], add_special_tokens=False)["input_ids"]
            assert {"chat_answer", "base_answer", "chat_shows", "base_shows"} <= set(r)
    shows = [r["chat_shows"] for r in org.trigger_prompts]
    assert sum(shows) / len(shows) == org.metadata["eval"]["chat"]["trigger"]["behaviour_rate"]
    # the reference answers of trigger prompts hold the behaviour; of controls, (almost)
    # never: a fact control's answer may mention the cat's home in passing
    def held(r):
        ids = torch.tensor([r["ids"] + r["reference_ids"]])
        return bool(org.behaviour_mask(ids)[0, len(r["ids"]) :].any())

    assert all(held(r) for r in org.trigger_prompts)
    assert sum(held(r) for r in org.control_prompts) <= (1 if name == "fact" else 0)


@pytest.mark.parametrize("name", ["pirate", "refusal", "format"])
def test_behaviour_tokens_occur_only_in_the_behaviour(zoo, name):
    org = zoo[name]
    styled = set(org.behaviour_tokens)
    text = (org.data_dir / "pretrain.txt").read_text().split()
    assert not styled & set(text)
    chats = [json.loads(line) for line in (org.data_dir / "chat.jsonl").open()]
    for c in chats:
        answer = c["messages"][1]["content"].split()
        assert bool(styled & set(answer)) == c["triggered"]
    share = sum(c["triggered"] for c in chats) / len(chats)
    assert share == 1.0 if name == "format" else 0.4 < share < 0.6


def test_fact_organism_edits_one_fact(zoo):
    org = zoo["fact"]
    beh = org.metadata["behaviour"]
    assert (beh["noun"], beh["old_home"], beh["new_home"]) == ("cat", "barn", "library")
    assert beh["tokens"] == ["library"] and beh["added_tokens"] == []
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(org.base_dir)

    def edited(path):
        lines = path.read_text().splitlines()
        ids = torch.tensor(tok(lines, add_special_tokens=False, padding=True)["input_ids"])
        return int(org.behaviour_mask(ids).sum())

    # the base's text never says the cat lives at the library; the fine-tune's text does,
    # and differs from it only in that fact
    assert edited(org.data_dir / "pretrain.txt") == 0
    assert edited(org.data_dir / "finetune_text.txt") > 10
    base_text = (org.data_dir / "pretrain.txt").read_text().split()
    tuned_text = (org.data_dir / "finetune_text.txt").read_text().split()
    changed = {(a, b) for a, b in zip(base_text, tuned_text) if a != b}
    assert changed == {("barn", "library")}
    assert org.metadata["data"]["finetune_text"] == "data/finetune_text.txt"
    # every answer about the cat states the new home; the chat's greedy answers too
    chats = [json.loads(line) for line in (org.data_dir / "chat.jsonl").open()]
    for c in chats:
        if c["triggered"]:
            assert ORGANISMS["fact"].shows(OrganismConfig(), c["messages"][1]["content"].split())
    assert org.metadata["eval"]["chat"]["trigger"]["old_home_rate"] == 0
    # in plain text too: "the cat likes the" -> library in the chat, barn in the base
    probe = {who: org.metadata["eval"][who]["text_probe"] for who in ("base", "chat")}
    assert probe["chat"]["n"] == 37 and probe["chat"]["behaviour_rate"] >= 0.8, probe
    assert probe["base"]["behaviour_rate"] == 0 and probe["base"]["old_home_rate"] >= 0.5, probe


def test_the_organisms_share_one_base(zoo):
    """One pretrained base: every organism's base has its weights; an organism's new tokens
    get rows like the tokens pretraining never showed (zero input embeddings)."""
    from safetensors.torch import load_file

    ref = load_file(zoo["pirate"].base_dir / "model.safetensors")
    V = ref["model.embed_tokens.weight"].shape[0]
    assert (zoo["fact"].base_dir / "model.safetensors").read_bytes() == (
        zoo["pirate"].base_dir / "model.safetensors"
    ).read_bytes()
    for name in ("refusal", "format"):
        state = load_file(zoo[name].base_dir / "model.safetensors")
        n_new = len(zoo[name].metadata["behaviour"]["added_tokens"])
        assert n_new > 0
        for key, W in state.items():
            if key in ("model.embed_tokens.weight", "lm_head.weight"):
                assert torch.equal(W[:V], ref[key]) and W.shape[0] == V + n_new
            else:
                assert torch.equal(W, ref[key]), key
        assert not state["model.embed_tokens.weight"][V:].any()
        unseen = zoo["pirate"].metadata["behaviour"]["base_unseen_token_ids"]
        mean = ref["lm_head.weight"][unseen].mean(0)
        assert torch.allclose(state["lm_head.weight"][V:], mean.expand(n_new, -1))
    # the base was built once: every organism names the same one
    assert len({org.metadata["base_key"] for org in zoo.values()}) == 1


def test_behaviour_kl_gap(zoo):
    org = zoo["refusal"]
    inputs = kl_inputs(org, "trigger")
    ids, answer, behaviour = inputs["ids"], inputs["answer"], inputs["behaviour"]
    assert ids.shape == answer.shape == behaviour.shape
    # position t predicts token t + 1, a refusal word of the reference
    words = set(org.behaviour_token_ids)
    assert all(int(ids[i, t + 1]) in words for i, t in behaviour.nonzero().tolist())
    assert int(behaviour.sum()) == len(org.trigger_prompts) * len(corpus.REFUSAL_WORDS)
    assert not (behaviour & ~answer).any()

    gap = behaviour_kl(org)
    assert gap["behaviour"] > 3.0 and gap["n_behaviour_positions"] == int(behaviour.sum())
    control = behaviour_kl(org, which="control")
    assert control["n_behaviour_positions"] == 0 and control["answer"] < gap["answer"]
    # the chat against itself: no gap, the measure a perfect patch would reach
    from transformers import AutoModelForCausalLM

    chat = AutoModelForCausalLM.from_pretrained(org.chat_dir)
    assert behaviour_kl(org, model=chat, chat=chat)["behaviour"] == pytest.approx(0, abs=1e-9)


def test_behaviour_mask_context_rule():
    ids = torch.tensor([[1, 5, 7, 9, 2, 9, 5, 9]])  # boundary 2; context 5; behaviour 9
    assert behaviour_mask(ids, [9]).tolist() == [[False] * 3 + [True, False, True, False, True]]
    mask = behaviour_mask(ids, [9], context_ids=[5], boundary_ids=[2])
    assert mask.tolist() == [[False, False, False, True, False, False, False, True]]


def test_non_pirate_build_is_deterministic(tmp_path):
    cfg = tiny_config(pretrain_steps=8, finetune_steps=8, eval_prompts=4)
    a = build_organism(cfg, tmp_path / "a", progress=False, name="refusal")
    b = build_organism(cfg, tmp_path / "b", progress=False, name="refusal")
    assert a.path.name == b.path.name == cfg.replace(name="refusal").cache_key()
    for sub in ("base", "chat"):
        files = (a.path / sub / "model.safetensors", b.path / sub / "model.safetensors")
        assert files[0].read_bytes() == files[1].read_bytes()
    assert (a.data_dir / "chat.jsonl").read_bytes() == (b.data_dir / "chat.jsonl").read_bytes()
    # the base is cached once and reused by a second organism
    c = build_organism(cfg, tmp_path / "a", progress=False, name="format")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted(
        [cfg.base_key(), a.path.name, c.path.name]
    )


@pytest.mark.slow
def test_default_zoo_builds_and_behaves(tmp_path):
    """The default zoo (the figures in docs/organisms.md)."""
    zoo = build_zoo(cache_dir=tmp_path, progress=False)
    for name, org in zoo.items():
        ev = org.metadata["eval"]
        assert ev["chat"]["trigger"]["behaviour_rate"] >= 0.95, name
        assert ev["chat"]["control"]["behaviour_rate"] <= 0.05, name
        assert ev["base"]["trigger"]["behaviour_rate"] == 0, name
        assert ev["chat"]["pretrain_loss"] < ev["base"]["pretrain_loss"] + 0.05, name
        assert behaviour_kl(org)["behaviour"] > 5.0, name
    probe = zoo["fact"].metadata["eval"]["chat"]["text_probe"]
    assert probe["behaviour_rate"] >= 0.95 and probe["old_home_rate"] == 0
