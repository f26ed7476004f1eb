"""Stage bookkeeping and pipeline config validation."""

import pytest

from crosscoders.errors import ConfigError
from crosscoders.pipeline import PipelineConfig
from crosscoders.pipeline.stages import run_stage

HARVEST = {"models": [{"path": "base"}, {"path": "chat"}], "data": [{"path": "x.txt"}]}


def test_stage_skips_resumes_and_redoes(tmp_path):
    calls, log = [], []

    def work(directory):
        calls.append(directory.name)
        (directory / "out.txt").write_text("done")
        return 42

    stage_dir = tmp_path / "s"
    first = run_stage("s", stage_dir, {"a": 1}, [], work, log.append)
    assert first.status == "ran" and first.result == 42 and calls == ["s"]
    again = run_stage("s", stage_dir, {"a": 1}, [], work, log.append, load=lambda d: "loaded")
    assert again.status == "skipped" and again.result == "loaded" and len(calls) == 1
    assert again.hash == first.hash
    changed = run_stage("s", stage_dir, {"a": 2}, [], work, log.append)
    assert changed.status == "redone" and changed.hash != first.hash
    assert "a: 1 -> 2" in log[-1]
    upstream = run_stage("s", stage_dir, {"a": 2}, ["new"], work, log.append)
    assert upstream.status == "redone" and "earlier stage" in log[-1]


def test_interrupted_stage_is_resumed_not_wiped(tmp_path):
    stage_dir = tmp_path / "s"

    def crash(directory):
        (directory / "partial").write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_stage("s", stage_dir, {"a": 1}, [], crash, lambda m: None)
    seen = []
    outcome = run_stage("s", stage_dir, {"a": 1}, [],
                        lambda d: seen.append((d / "partial").read_text()), lambda m: None)
    assert outcome.status == "resumed" and seen == ["half"]


def test_pipeline_config_errors_name_the_key():
    ok = PipelineConfig.from_dict({"harvest": HARVEST, "crosscoder": {"k": 8, "expansion": 4}})
    cc = ok.crosscoder_config(n_sources=2, d_model=16)
    assert cc.dict_size == 64 and cc.k == 8
    with pytest.raises(ConfigError, match="unknown key crosscoder.lambda"):
        PipelineConfig.from_dict({"harvest": HARVEST, "crosscoder": {"lambda": 1}})
    with pytest.raises(ConfigError, match="crosscoder.d_model .*read from the activation store"):
        PipelineConfig.from_dict({"harvest": HARVEST, "crosscoder": {"d_model": 3}})
    with pytest.raises(ConfigError, match="crosscoder.k: expected an integer"):
        PipelineConfig.from_dict({"harvest": HARVEST, "crosscoder": {"k": "eight"}})
    with pytest.raises(ConfigError, match="train.steps: expected an integer"):
        PipelineConfig.from_dict({"harvest": HARVEST, "train": {"steps": "many"}})
    with pytest.raises(ConfigError, match="unknown key train.stpes"):
        PipelineConfig.from_dict({"harvest": HARVEST, "train": {"stpes": 3}})
    with pytest.raises(ConfigError, match="harvest.tokens: expected an integer"):
        PipelineConfig.from_dict({"harvest": {**HARVEST, "tokens": "lots"}})
    with pytest.raises(ConfigError, match="unknown key harvest.models\\[0\\]|models"):
        PipelineConfig.from_dict({"harvest": {**HARVEST, "models": [{"pth": "x"}]}})
