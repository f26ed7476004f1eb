"""Experiment tracking: wandb (offline) and TensorBoard receive the metrics, the config and
the end-of-run summary; a killed and resumed run logs every step exactly once; a missing
library is one clear error before any work."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import numpy as np
import pytest

from crosscoders import Crosscoder, CrosscoderConfig, TrainConfig, train
from crosscoders.cli import main as cli_main
from crosscoders.errors import ConfigError, CrosscodersError
from crosscoders.train.tracking import TRACKING_FILE, logger_names
from helpers import planted_acts

SRC = Path(__file__).resolve().parents[1] / "src"
TESTS = Path(__file__).resolve().parent
FAST = dict(batch_size=128, progress=False, eval_tokens=256, log_every=2, eval_every=6,
            checkpoint_every=6)
NAMES = ["base", "chat"]
WANDB_OFFLINE = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONSOLE": "off",
                 "WANDB_DISABLE_GIT": "true"}
TRAIN_KEYS = {"train/loss", "train/recon", "train/l0", "train/dead_frac", "train/lr",
              "train/fvu/base", "train/fvu/chat"}
EVAL_KEYS = {"eval/fvu/base", "eval/fvu/chat", "eval/l0", "eval/dead_frac"}
HARVEST = {"models": [{"path": "base"}, {"path": "chat"}], "data": [{"path": "x.txt"}]}
CATEGORY_KEYS = {"categories/shared", "categories/base_only", "categories/chat_only",
                 "categories/other"}


def _cfg():
    return CrosscoderConfig(n_sources=2, d_model=16, dict_size=64, k=4, source_names=NAMES)


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    """wandb logging locally into tmp_path/wandb, quietly, without a login. Yields a
    function that stops wandb's service: only then are its files complete."""
    wandb = pytest.importorskip("wandb")
    for key, value in WANDB_OFFLINE.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))

    def stop():
        wandb.teardown()
        # the service is announced to child processes in the environment
        os.environ.pop("WANDB_SERVICE", None)

    yield stop
    stop()


# ----------------------------------------------------------------------- reading the files


def _wandb_records(path: Path):
    """The protobuf records of a wandb transaction log (``run-<id>.wandb``): a 7-byte
    header, then 32 KiB blocks of chunks (crc32, 2-byte length, type, data); type 1 is a
    whole record, 2/3/4 its first/middle/last part."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a wandb transaction log"
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        if kind == 0:  # zeros after a kill: nothing more was written
            return
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def _wandb_offline_run(run_dir: Path) -> dict:
    """What one offline run directory holds: its id, project, config, history rows by step
    and the summary (values JSON-decoded)."""
    files = list(run_dir.glob("run-*.wandb"))
    assert len(files) == 1, files
    out = {"dir": run_dir.name, "id": None, "project": None, "config": {}, "history": [],
           "summary": {}}
    for record in _wandb_records(files[0]):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out["id"], out["project"] = record.run.run_id, record.run.project
            out["name"] = record.run.display_name
        elif kind == "config":
            out["config"].update({i.key: json.loads(i.value_json) for i in record.config.update})
        elif kind == "history":
            row = {i.key or "/".join(i.nested_key): json.loads(i.value_json)
                   for i in record.history.item}
            out["history"].append(row)
        elif kind == "summary":
            out["summary"].update({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                   for i in record.summary.update})
    return out


def _wandb_runs(wandb_dir: Path) -> list[dict]:
    """Every offline run under ``wandb_dir`` (WANDB_DIR/wandb), oldest first."""
    return [_wandb_offline_run(d) for d in sorted(wandb_dir.glob("offline-run-*"))]


def _tensorboard(log_dir: Path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "histograms": 0,
                                                           "tensors": 0})
    events.Reload()
    return events


def _jsonl_steps(run_dir: Path, split: str = "train") -> list[int]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r["step"] for r in map(json.loads, lines) if r["split"] == split]


# ----------------------------------------------------------------------- wandb


def test_wandb_offline_run_holds_metrics_config_and_summary(tmp_path, wandb_offline):
    acts, _ = planted_acts(n=2048)
    run_dir = tmp_path / "run"
    tc = TrainConfig(steps=12, wandb_project="crosscoders-test", wandb_run_name="tiny", **FAST)
    assert logger_names(tc) == ["jsonl", "wandb"]
    train(_cfg(), acts, tc, run_dir=run_dir)
    wandb_offline()

    (run,) = _wandb_runs(tmp_path / "wandb")
    assert run["id"] == json.loads((run_dir / TRACKING_FILE).read_text())["wandb_run_id"]
    assert (run["project"], run["name"]) == ("crosscoders-test", "tiny")
    assert run["config"]["train"]["steps"] == 12
    assert run["config"]["crosscoder"]["dict_size"] == 64
    assert run["config"]["data"]["n_tokens"] == 2048
    steps = [row["_step"] for row in run["history"]]
    assert steps == list(range(2, 13, 2))  # each logged step once, in order
    for row in run["history"]:
        assert TRAIN_KEYS <= set(row), sorted(row)
        assert (EVAL_KEYS <= set(row)) == (row["_step"] % 6 == 0), sorted(row)
    # the same numbers as metrics.jsonl
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last_train = [r for r in records if r["split"] == "train"][-1]
    assert run["history"][-1]["train/loss"] == pytest.approx(last_train["loss"], rel=1e-12)
    # the end of the run: relative-norm histogram and category counts
    summary = run["summary"]
    norms_FS = Crosscoder.load(run_dir).decoder_norms().detach().double().numpy()
    rel_F = norms_FS[:, 1] / norms_FS.sum(1)  # in normalised units, chat / (base + chat)
    assert summary["rel_norm"]["_type"] == "histogram"
    assert summary["rel_norm"]["values"] == np.histogram(rel_F, 50, (0, 1))[0].tolist()
    assert sum(summary[k] for k in CATEGORY_KEYS) == 64


def test_wandb_run_is_continued_by_id_and_skips_steps_it_holds(tmp_path, monkeypatch):
    """With a stand-in wandb module: every attempt reuses the saved id with resume=allow
    and sends the steps after its checkpoint and after those the server says it holds
    (``starting_step``), so none twice."""
    from crosscoders.train.trainer import Trainer

    calls, starting = [], iter([0, 9, 17])  # what the server holds: nothing, up to 8, 16

    class Run:
        def __init__(self, kwargs):
            self.kwargs, self.logged, self.summary, self.finished = kwargs, [], {}, None
            self.keys = set()
            self.starting_step = next(starting)
            self.config = types.SimpleNamespace(update=lambda d, allow_val_change: None)

        def log(self, row, step):
            self.logged.append(step)
            self.keys |= set(row)

        def finish(self, exit_code):
            self.finished = exit_code

    stub = types.ModuleType("wandb")
    stub.init = lambda **kwargs: calls.append(Run(kwargs)) or calls[-1]
    stub.Histogram = lambda np_histogram: ("histogram", np_histogram)
    monkeypatch.setitem(sys.modules, "wandb", stub)
    monkeypatch.delenv("WANDB_DIR", raising=False)
    stop_at, step = [9], Trainer.train_step

    def train_step(self, x_BSD):
        if self.step == stop_at[0]:
            raise KeyboardInterrupt
        return step(self, x_BSD)

    monkeypatch.setattr(Trainer, "train_step", train_step)
    acts, _ = planted_acts(n=2048)
    run_dir = tmp_path / "run"
    tc = TrainConfig(steps=20, loggers=["wandb"], **FAST)
    for stop in (9, 15, None):  # checkpoints at 6, 12, 18
        stop_at[0] = stop
        if stop is None:
            train(_cfg(), acts, tc, run_dir=run_dir)
        else:
            with pytest.raises(KeyboardInterrupt):
                train(_cfg(), acts, tc, run_dir=run_dir)

    assert len({run.kwargs["id"] for run in calls}) == 1
    assert all(run.kwargs["resume"] == "allow" for run in calls)
    assert all(run.kwargs["dir"] == str(run_dir) for run in calls)  # no WANDB_DIR set
    # a step's train and eval records are two calls (one row): eval at 6, 12, 18, 20
    assert [run.logged for run in calls] == [[2, 4, 6, 6, 8], [10, 12, 12, 14],
                                             [18, 18, 20, 20]]
    assert TRAIN_KEYS | EVAL_KEYS <= calls[0].keys
    assert [run.finished for run in calls] == [1, 1, 0]
    assert sum(calls[-1].summary[k] for k in CATEGORY_KEYS) == 64
    assert calls[-1].summary["rel_norm"][1][0].sum() == 64
    state = json.loads((run_dir / TRACKING_FILE).read_text())
    assert state == {"wandb_run_id": calls[0].kwargs["id"]}


# ----------------------------------------------------------------------- TensorBoard


def test_tensorboard_event_files_read_back(tmp_path):
    pytest.importorskip("tensorboard")
    acts, _ = planted_acts(n=2048)
    run_dir, tb_dir = tmp_path / "run", tmp_path / "tb"
    tc = TrainConfig(steps=12, loggers=[], tensorboard_dir=str(tb_dir), **FAST)
    train(_cfg(), acts, tc, run_dir=run_dir)

    assert not (run_dir / "metrics.jsonl").exists()  # loggers=[]: no JSONL
    events = _tensorboard(tb_dir)
    tags = set(events.Tags()["scalars"])
    assert TRAIN_KEYS | EVAL_KEYS | CATEGORY_KEYS <= tags, sorted(tags)
    assert [e.step for e in events.Scalars("train/loss")] == list(range(2, 13, 2))
    assert [e.step for e in events.Scalars("eval/fvu/chat")] == [6, 12]
    assert sum(events.Scalars(k)[-1].value for k in CATEGORY_KEYS) == 64
    (histogram,) = events.Histograms("rel_norm")
    assert histogram.step == 12 and histogram.histogram_value.num == 64
    assert 0 <= histogram.histogram_value.min <= histogram.histogram_value.max <= 1
    (config,) = events.Tensors("config/text_summary")
    assert b'"dict_size": 64' in config.tensor_proto.string_val[0]


# ----------------------------------------------------------------------- kill and resume

RUNNER = textwrap.dedent("""
    import os, signal, sys, torch
    torch.set_num_threads(1)
    sys.path.insert(0, {tests!r})
    from helpers import planted_acts
    from crosscoders import Crosscoder, CrosscoderConfig, TrainConfig, train
    from crosscoders.train.trainer import Trainer

    kill_at = int(sys.argv[2])
    step = Trainer.train_step

    def train_step(self, x_BSD):  # SIGKILL itself: no clean-up, no flush, like a crash
        if self.step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return step(self, x_BSD)

    Trainer.train_step = train_step
    acts, _ = planted_acts(n=2048)
    cfg = CrosscoderConfig(n_sources=2, d_model=16, dict_size=64, k=4,
                           source_names=["base", "chat"])
    tc = TrainConfig(steps=20, batch_size=128, log_every=1, eval_every=5, checkpoint_every=6,
                     eval_tokens=256, progress=False, loggers={loggers!r},
                     tensorboard_dir=sys.argv[1] + "/tb")
    train(cfg, acts, tc, run_dir=sys.argv[1])
""")


def _run(run_dir: Path, kill_at: int, loggers: list[str], env: dict
         ) -> subprocess.CompletedProcess:
    script = RUNNER.format(tests=str(TESTS), loggers=loggers)
    # each process starts its own wandb service (a shared one would still hold the killed
    # process's run)
    inherited = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    env = {**inherited, **env, "PYTHONPATH": os.pathsep.join(
        p for p in (str(SRC), os.environ.get("PYTHONPATH")) if p)}
    return subprocess.run([sys.executable, "-c", script, str(run_dir), str(kill_at)], env=env,
                          capture_output=True, text=True, timeout=600)


def test_killed_and_resumed_run_logs_each_step_once(tmp_path):
    pytest.importorskip("tensorboard")
    has_wandb = True
    try:
        import wandb  # noqa: F401
    except ImportError:
        has_wandb = False
    loggers = ["jsonl", "tensorboard"] + (["wandb"] if has_wandb else [])
    env = {**WANDB_OFFLINE, "WANDB_DIR": str(tmp_path)}
    run_dir = tmp_path / "run"
    # killed after step 15: the checkpoint is at step 12, steps 13-15 were logged already
    killed = _run(run_dir, 15, loggers, env)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert not (run_dir / "model.safetensors").exists()
    assert max(_jsonl_steps(run_dir)) >= 13
    resumed = _run(run_dir, -1, loggers, env)  # the same command again resumes at 12
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    every_step = list(range(1, 21))
    assert _jsonl_steps(run_dir) == every_step
    assert _jsonl_steps(run_dir, "eval") == [5, 10, 15, 20]
    events = _tensorboard(run_dir / "tb")
    logged = events.Scalars("train/loss")
    assert [e.step for e in logged] == every_step
    assert [e.step for e in events.Scalars("eval/l0")] == [5, 10, 15, 20]
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["split"] == "train"]
    np.testing.assert_allclose([e.value for e in logged], losses, rtol=1e-6)
    (config,) = events.Tensors("config/text_summary")  # written once, at the start
    assert len(events.Histograms("rel_norm")) == 1
    # how: each attempt's event file starts by purging what earlier ones wrote from its
    # first step on (everything, for a fresh start)
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.compat.proto.event_pb2 import SessionLog

    files = sorted((run_dir / "tb").glob("events.out.tfevents.*"))
    purges = [[e.step for e in EventFileLoader(str(f)).Load()
               if e.HasField("session_log") and e.session_log.status == SessionLog.START]
              for f in files]
    assert purges == [[0], [13]]

    if not has_wandb:
        return
    killed, resumed = _wandb_runs(tmp_path / "wandb")
    run_id = json.loads((run_dir / TRACKING_FILE).read_text())["wandb_run_id"]
    assert killed["dir"].endswith(f"-{run_id}") and resumed["id"] == run_id
    # what wandb wrote before the kill (its log is flushed every few seconds: maybe
    # nothing), then the steps after the checkpoint, each once
    before = [row["_step"] for row in killed["history"]]
    assert before == sorted(set(before)) and set(before) <= set(range(1, 16))
    assert [row["_step"] for row in resumed["history"]] == list(range(13, 21))
    assert [r["_step"] for r in resumed["history"] if "eval/l0" in r] == [15, 20]
    assert sum(resumed["summary"][k] for k in CATEGORY_KEYS) == 64


# ----------------------------------------------------------------------- bad input


@pytest.mark.parametrize("name, settings", [
    ("wandb", {"wandb_project": "p"}),
    ("wandb", {"loggers": ["jsonl", "wandb"]}),
    ("tensorboard", {"loggers": ["tensorboard"]}),
])
def test_missing_library_is_one_line_before_any_work(name, settings, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, name, None)  # import fails as if not installed
    run_dir = tmp_path / "run"
    acts, _ = planted_acts(n=512)
    with pytest.raises(CrosscodersError) as err:
        train(_cfg(), acts, TrainConfig(steps=4, **{**FAST, **settings}), run_dir=run_dir)
    message = str(err.value)
    assert "\n" not in message
    assert f"pip install 'crosscoders[{name}]'" in message
    assert not run_dir.exists()  # refused before the run directory was made


def test_cli_reports_missing_wandb_with_the_fix(tmp_path, monkeypatch, capsys):
    import torch

    monkeypatch.setitem(sys.modules, "wandb", None)
    acts, _ = planted_acts(n=512)
    torch.save(acts, tmp_path / "acts.pt")
    (tmp_path / "cc.yaml").write_text("train:\n  wandb_project: p\n  progress: false\n")
    code = cli_main(["train", "--data", str(tmp_path / "acts.pt"), "--out",
                     str(tmp_path / "run"), "--config", str(tmp_path / "cc.yaml")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("error: the wandb logger needs the wandb package")
    assert "pip install 'crosscoders[wandb]'" in err and "\n" not in err
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_cli_tensorboard_flag_writes_event_files(tmp_path, capsys):
    import torch

    acts, _ = planted_acts(n=512)
    torch.save(acts, tmp_path / "acts.pt")
    code = cli_main(["train", "--data", str(tmp_path / "acts.pt"), "--out",
                     str(tmp_path / "run"), "--steps", "6", "--batch-size", "64",
                     "--tensorboard", str(tmp_path / "tb"), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    events = _tensorboard(tmp_path / "tb")
    steps = [e.step for e in events.Scalars("train/loss")]
    assert steps == sorted(set(steps)) and steps[-1] == 6
    assert _jsonl_steps(tmp_path / "run")[-1] == 6  # jsonl stays on beside it


def test_tensorboard_dir_that_is_a_file_is_refused_before_writing(tmp_path, capsys):
    import torch

    pytest.importorskip("tensorboard")
    acts, _ = planted_acts(n=512)
    torch.save(acts, tmp_path / "acts.pt")
    (tmp_path / "afile").write_text("mine")
    code = cli_main(["train", "--data", str(tmp_path / "acts.pt"), "--out",
                     str(tmp_path / "run"), "--tensorboard", str(tmp_path / "afile"),
                     "--steps", "2", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "afile" in err and "\n" not in err
    assert not (tmp_path / "run").exists()
    assert (tmp_path / "afile").read_text() == "mine"


def test_tensorboard_without_a_directory_is_refused(tmp_path):
    pytest.importorskip("tensorboard")
    acts, _ = planted_acts(n=512)
    with pytest.raises(ConfigError, match="tensorboard_dir .*or train into a run directory"):
        train(_cfg(), acts, TrainConfig(steps=4, loggers=["tensorboard"], **FAST))
    tc = TrainConfig(steps=4, loggers=["tensorboard"], **FAST)
    train(_cfg(), acts, tc, run_dir=tmp_path / "run")  # beside the run by default
    assert [e.step for e in _tensorboard(tmp_path / "run" / "tensorboard").Scalars(
        "train/loss")] == [2, 4]


def test_tracking_settings_load_from_yaml_and_resume_freely(tmp_path):
    from crosscoders.pipeline.config import PipelineConfig
    from crosscoders.pipeline.run import train_identity

    tc = TrainConfig.from_dict({"loggers": ["jsonl", "tensorboard"], "wandb_project": "p",
                                "tensorboard_dir": "tb"})
    assert logger_names(tc) == ["jsonl", "tensorboard", "wandb"]
    with pytest.raises(ConfigError, match=r"loggers\[0\]: expected one of"):
        TrainConfig.from_dict({"loggers": ["mlflow"]})
    section = PipelineConfig.from_dict({"harvest": HARVEST,
                                        "train": {"wandb_project": "p"}}).train
    assert section.wandb_project == "p"
    # where metrics go neither refuses a resume nor redoes a finished pipeline stage
    assert set(TrainConfig.TRACKING_FIELDS) <= set(TrainConfig.RESUMABLE_CHANGES)
    assert train_identity(tc) == train_identity(TrainConfig())
