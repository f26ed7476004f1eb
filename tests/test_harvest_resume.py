"""kill -9 during a harvest, run it again: the finished store equals an uninterrupted one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import torch

from crosscoders.harvest import DataSpec, HarvestConfig, ModelSpec, harvest
from crosscoders.testing import make_model, make_tokenizer, write_text_corpus

CHILD = """
import sys, time
from crosscoders.harvest import HarvestConfig, harvest
from crosscoders.store import writer

commit = writer.StoreWriter.commit
def slow_commit(self, *args, **kwargs):
    commit(self, *args, **kwargs)
    time.sleep(0.15)  # leave time to be killed in the middle
writer.StoreWriter.commit = slow_commit
harvest(HarvestConfig.load(sys.argv[1]), sys.argv[2], progress=False)
"""


def _config(root, sequential: bool) -> HarvestConfig:
    return HarvestConfig(
        models=[
            ModelSpec(str(root / "base"), sites=["0.5"], name="base"),
            ModelSpec(str(root / "chat"), sites=["0.5"], name="chat"),
        ],
        data=[DataSpec(str(root / "text.jsonl"))],
        tokens=1200,
        context_length=20,
        batch_size=2,
        shard_tokens=100,
        store_dtype="bfloat16",
        device="cpu",
        sequential=sequential,
    )


def _shards_done(path) -> int:
    try:
        progress = json.loads((path / "progress.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return 0
    return sum(progress["done"].values())


def _kill_then_resume(tmp_path, sequential: bool) -> None:
    tok = make_tokenizer()
    make_model(tmp_path / "base", "llama", seed=0, tokenizer=tok)
    make_model(tmp_path / "chat", "llama", seed=1, tokenizer=tok)
    write_text_corpus(tmp_path / "text.jsonl", 300, seed=5)
    cfg = _config(tmp_path, sequential)
    cfg.save(tmp_path / "harvest.yaml")
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(tmp_path / "harvest.yaml"), str(out)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    target = 16 if sequential else 9  # mid-way (in sequential mode: inside the second model's pass)
    while _shards_done(out) < target and child.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert child.poll() is None, "the harvest finished before it could be killed"
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert not (out / "manifest.json").exists()

    resumed = harvest(cfg, out, progress=False)
    fresh = harvest(cfg, tmp_path / "fresh", progress=False)
    assert resumed.n_tokens == fresh.n_tokens == 1200
    assert torch.equal(resumed.rows(0, 1200), fresh.rows(0, 1200))
    np.testing.assert_array_equal(resumed.rows_meta, fresh.rows_meta)
    # Byte-identical shard files and the same manifest (it lists every file's sha256).
    assert resumed.manifest == fresh.manifest
    assert not list(out.glob("shards/*/.*.tmp"))


def test_kill_9_then_resume_gives_the_uninterrupted_store(tmp_path):
    _kill_then_resume(tmp_path, sequential=False)


def test_kill_9_in_sequential_mode_resumes_the_second_model(tmp_path):
    _kill_then_resume(tmp_path, sequential=True)
