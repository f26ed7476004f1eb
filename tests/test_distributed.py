"""Data-parallel training: 2 gloo processes on CPU train what one process trains.

The processes are started as torchrun would start them (its environment variables), or by
torchrun itself for the command line. Every rank reads only its slice of each global
batch; the weights after training equal one process's on the same global batches.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

from crosscoders import Crosscoder, CrosscoderConfig, TrainConfig, train
from crosscoders.cli import main as cli_main
from crosscoders.data import TensorSource, shard_rows, sharded_batches
from crosscoders.errors import ConfigError, CrosscodersError, DataError
from crosscoders.model.sparse import batch_topk
from crosscoders.pipeline.run import train_identity
from crosscoders.train import distributed
from crosscoders.train.distributed import DataParallel
from crosscoders.train.loss import global_batch_topk
from crosscoders.train.trainer import Trainer
from helpers import planted_acts

TESTS = Path(__file__).parent
SRC = TESTS.parent / "src"
WORKER = TESTS / "ddp_worker.py"


def _env(**extra) -> dict:
    path = os.pathsep.join([str(SRC), str(TESTS), os.environ.get("PYTHONPATH", "")])
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    return {**env, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", **extra}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(spec: dict, world: int = 2) -> list[subprocess.Popen]:
    """``world`` ranks of ddp_worker.py, started with torchrun's variables."""
    port = str(_free_port())
    return [subprocess.Popen(
        [sys.executable, str(WORKER), json.dumps(spec)], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
        env=_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world),
                 MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
        for r in range(world)]


def _finish(procs: list[subprocess.Popen], timeout: float = 240) -> list[tuple[int, str]]:
    out = []
    for proc in procs:
        _, err = proc.communicate(timeout=timeout)
        out.append((proc.returncode, err))
    return out


def _job(run_dir: Path, activation: str, steps: int, dict_size: int = 512, **train_kw) -> dict:
    crosscoder = {"n_sources": 2, "d_model": 16, "dict_size": dict_size, "k": 4,
                  "activation": activation}
    tc = {"steps": steps, "batch_size": 128, "checkpoint_every": 10, "eval_every": 25,
          "log_every": 5, "eval_tokens": 256, "progress": False, "dist_timeout_minutes": 0.5,
          **train_kw}
    return {"run_dir": str(run_dir), "crosscoder": crosscoder, "train": tc}


@contextmanager
def _one_thread():
    """One torch thread, as each rank has: tiny GEMMs on two threads of a busy machine
    spend most of their time waiting for each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _single(job: dict, n_tokens: int = 4096, run_dir: Path | None = None
            ) -> dict[str, torch.Tensor]:
    """The job trained by this (one) process: its final weights."""
    acts, _ = planted_acts(n=n_tokens)
    with _one_thread():
        model = train(CrosscoderConfig.from_dict(job["crosscoder"]), acts,
                      TrainConfig.from_dict(job["train"]), run_dir)
    return model.state_dict()


def _assert_same_weights(run_dir: Path, reference: dict[str, torch.Tensor]) -> None:
    trained = Crosscoder.load(run_dir).state_dict()
    for name in ("W_enc_FSD", "W_dec", "b_enc", "b_dec"):
        torch.testing.assert_close(trained[name], reference[name], rtol=1e-5, atol=1e-5,
                                   msg=name)


def _records(run_dir: Path, split: str = "train") -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


# ----------------------------------------------------------------- two processes


def _kill_job(run_dir: Path) -> dict:
    return _job(run_dir, "batchtopk", 120, dict_size=128, dead_after_tokens=512, screen="on")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    """One launch of 2 ranks training three runs: BatchTopK and ReLU for 50 steps, and the
    uninterrupted twin of the kill test's run."""
    root = tmp_path_factory.mktemp("two_ranks")
    jobs = [_job(root / "batchtopk", "batchtopk", 50, dead_after_tokens=512, screen="off"),
            _job(root / "relu", "relu", 50, dict_size=128), _kill_job(root / "whole")]
    # W_enc and W_dec get buckets of their own here (all-reduced from backward's hooks);
    # the kill test's runs keep every gradient in the flat bucket
    results = _finish(_launch({"jobs": jobs, "own_bucket_numel": 1024}))
    assert all(code == 0 for code, _ in results), results
    return root


@pytest.mark.parametrize("activation", ["batchtopk", "relu"])
def test_two_processes_train_the_single_process_weights(two_ranks, activation, tmp_path):
    """BatchTopK over the global batch with AuxK reviving dead latents, and ReLU + L1:
    50 steps on 2 ranks give one process's weights, metrics and run.json records.

    The ranks' summed gradients differ from one process's only by rounding (~1e-7); Adam
    divides by the gradient's scale, so entries whose gradient nearly cancels (many in a
    wide, barely active ReLU dictionary) can drift further: the ReLU case is kept small."""
    run_dir = two_ranks / activation
    job = json.loads((run_dir / "run.json").read_text())
    _assert_same_weights(run_dir, _single(job, run_dir=tmp_path / "single"))
    assert job["distributed"] == {"mode": "data", "world_size": 2}
    for split in ("train", "eval"):  # FVU about the global batch's / eval set's mean
        pairs = list(zip(_records(run_dir, split), _records(tmp_path / "single", split)))
        assert pairs and all(a["step"] == b["step"] for a, b in pairs)
        for ours, single in pairs:
            for key in (k for k in single if k.startswith("fvu/")):
                assert ours[key] == pytest.approx(single[key], rel=1e-4), (split, key)
    steps = [r["step"] for r in _records(run_dir)]
    assert steps == list(range(5, 51, 5))  # rank 0 alone writes the metrics
    assert _records(run_dir, "eval")[-1]["n_tokens"] == 256  # both halves evaluated
    if activation == "batchtopk":
        logged = _records(run_dir)
        assert any(r["auxk"] > 0 for r in logged) and logged[-1]["dead_frac"] > 0  # AuxK ran
        assert all(r["l0"] == 4.0 for r in logged)  # k per token over the global batch


def test_killed_rank_stops_the_other_and_the_run_resumes(two_ranks, tmp_path):
    """Rank 1 killed: rank 0 stops at once with one line; the same command again resumes
    and ends with exactly the uninterrupted run's weights (and one process's)."""
    run_dir = tmp_path / "run"
    job = _kill_job(run_dir)
    procs = _launch({"jobs": [job]})
    deadline = time.time() + 120
    while not (run_dir / "checkpoint.pt").exists() and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)
    os.kill(procs[1].pid, signal.SIGKILL)
    start = time.time()
    (code, err), _ = _finish(procs, timeout=120)
    assert time.time() - start < 60  # stopped, not hung
    assert code == 2, err
    message = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(message) == 1 and "another data-parallel process stopped" in message[0]
    assert "run the same command again to resume" in message[0]
    assert not (run_dir / "model.safetensors").exists(), "kill came too late to test resume"

    results = _finish(_launch({"jobs": [job]}))  # the same command again: resumes
    assert all(code == 0 for code, _ in results), results
    resumed = Crosscoder.load(run_dir).state_dict()
    whole = Crosscoder.load(two_ranks / "whole").state_dict()
    assert all(torch.equal(resumed[k], whole[k]) for k in whole)
    _assert_same_weights(run_dir, _single(job))
    steps = [r["step"] for r in _records(run_dir)]
    assert steps == list(range(5, 121, 5))  # no duplicates after the resume


# slow: once in four runs a rank aborted at exit ("terminate called without an active
# exception") after training had finished; the fast suite must not be flaky while that is
# investigated. `make test-all` runs it.
@pytest.mark.slow
def test_torchrun_cli_resumes_a_single_process_run_on_two(tmp_path):
    """`torchrun -m crosscoders train` continues a run one process started: the same
    global batches, so the weights match an uninterrupted single-process run; run.json
    and stderr say what changed."""
    acts, _ = planted_acts(n=2048)
    data = tmp_path / "acts.pt"
    torch.save(acts, data)
    out = tmp_path / "run"
    cfg = CrosscoderConfig(n_sources=2, d_model=16, dict_size=128, activation="batchtopk", k=4)
    tc = TrainConfig(steps=40, batch_size=128, checkpoint_every=10, progress=False)

    class Interrupted(TensorSource):
        def batches(self, batch_size, seed, start=0, shard=None):
            for i, batch in enumerate(super().batches(batch_size, seed, start, shard)):
                if i == 25:
                    raise KeyboardInterrupt
                yield batch

    with pytest.raises(KeyboardInterrupt), _one_thread():
        train(cfg, Interrupted(acts, tc.eval_tokens, name=str(data)), tc, run_dir=out)
    assert torch.load(out / "checkpoint.pt", weights_only=False)["step"] == 20

    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
         "2", "-m", "crosscoders", "train", "--data", str(data), "--out", str(out),
         "--activation", "batchtopk", "--dict-size", "128", "--k", "4", "--steps", "40",
         "--batch-size", "128", "--checkpoint-every", "10", "--no-progress"],
        env=_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr
    assert "at step 20 on 2 data-parallel processes instead of 1 process" in proc.stderr
    assert proc.stdout.count("saved crosscoder") == 1  # rank 0 only
    run = json.loads((out / "run.json").read_text())
    assert run["distributed"] == {
        "mode": "data", "world_size": 2,
        "history": [{"step": 0, "mode": "none", "world_size": 1},
                    {"step": 20, "mode": "data", "world_size": 2}]}
    with _one_thread():
        reference = train(cfg, acts, tc)
    _assert_same_weights(out, reference.state_dict())


# ----------------------------------------------------------------- data layer


def _store(tmp_path):
    from test_store import write_store

    data = np.random.default_rng(0).standard_normal((100, 2, 8)).astype(np.float32)
    store = write_store(tmp_path / "store", data)
    store.chunk_rows, store.window_rows = 8, 24  # several windows per epoch
    return store, data


@pytest.mark.parametrize("kind", ["tensor", "store"])
@pytest.mark.parametrize("world, start", [(2, 0), (3, 5), (4, 7)])
def test_ranks_read_disjoint_slices_of_the_single_process_batches(tmp_path, kind, world,
                                                                   start):
    if kind == "store":
        source, data = _store(tmp_path)
    else:
        source = TensorSource(torch.randn(100, 2, 8), n_eval=10)
    B = 12
    whole = source.batches(B, seed=3, start=start)
    parts = [sharded_batches(source, B, 3, start=start, shard=(r, world))
             for r in range(world)]
    for _ in range(25):
        batch = next(whole)
        got = [next(p) for p in parts]
        assert all(g.shape[0] == B // world for g in got)
        assert torch.equal(torch.cat(got), batch)


def test_a_rank_reads_only_its_own_rows_of_the_store(tmp_path):
    store, data = _store(tmp_path)
    store._verified = set(range(len(store.shards)))  # no hashing reads: only the batches'
    read: list[int] = []
    real = store._shard_acts

    def spy(shard, s):  # the rows a reader takes from the shard files' memory maps
        array = real(shard, s)

        class Rows:
            def __getitem__(self, index):
                if s == 0:
                    rows = np.arange(array.shape[0])[index] + int(store._offsets[shard])
                    read.extend(np.atleast_1d(rows).tolist())
                return array[index]
        return Rows()

    B, world, rank = 12, 3, 1
    lo, hi = shard_rows(B, (rank, world))
    whole = store.batches(B, seed=3, start=2)
    batches = [next(whole) for _ in range(6)]  # positions 24..95: all the reader touches
    store._shard_acts = spy
    mine = store.batches(B, seed=3, start=2, shard=(rank, world))
    for batch in batches[:3]:
        assert torch.equal(next(mine), batch[lo:hi])
    key = {float(v): i for i, v in enumerate(data[:, 0, 0])}  # row of each value
    own = {key[float(v)] for b in batches for v in b[lo:hi, 0, 0]}
    others = {key[float(v)] for b in batches for v in b[:, 0, 0]} - own
    assert read and len(read) == len(set(read))
    assert set(read) <= own and not set(read) & others


def test_uneven_split_and_torchrun_settings_are_refused(monkeypatch):
    with pytest.raises(DataError, match="divisible by 3"):
        shard_rows(128, (0, 3))
    dp = DataParallel(0, 3, 0, torch.device("cpu"), timeout=None)
    with pytest.raises(DataError, match="batch size divisible by 3"):
        Trainer(_model(), TensorSource(torch.randn(256, 2, 16)),
                TrainConfig(batch_size=128, progress=False), dp=dp)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ConfigError, match="not started by torchrun"):
        train(CrosscoderConfig(n_sources=2, d_model=16, dict_size=32),
              torch.randn(64, 2, 16), TrainConfig(steps=1, parallel="data", progress=False))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="would all write the same run directory"):
        distributed.resolve_parallel("none")
    assert distributed.resolve_parallel("auto") == "data"


def _model():
    return Crosscoder(CrosscoderConfig(n_sources=2, d_model=16, dict_size=32))


def test_cli_parallel_data_without_torchrun_exits_2(tmp_path, capsys, monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    data = tmp_path / "acts.pt"
    torch.save(torch.randn(256, 2, 16), data)
    code = cli_main(["train", "--data", str(data), "--out", str(tmp_path / "r"),
                     "--parallel", "data", "--steps", "2", "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "torchrun --nproc-per-node N" in err
    assert len(err.splitlines()) == 1


def test_nccl_unavailable_is_refused(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(distributed, "_rank_device", lambda *a: torch.device("cuda", 0))
    monkeypatch.setattr(distributed.dist, "is_nccl_available", lambda: False)
    with pytest.raises(CrosscodersError, match="needs NCCL.*train on cpu"):
        DataParallel.from_env("cuda", 1.0)


def test_pipeline_hash_leaves_out_how_training_is_spread():
    base = train_identity(TrainConfig())
    assert train_identity(TrainConfig(parallel="data", dist_timeout_minutes=3)) == base
    assert "batchtopk_scope" not in base
    assert train_identity(TrainConfig(batchtopk_scope="local"))["batchtopk_scope"] == "local"


class _ThreadRanks:
    """Stand-in for the ranks' gather: threads that swap values through a barrier."""

    def __init__(self, world: int):
        self.world = world
        self.slots: list = [None] * world
        self.barrier = threading.Barrier(world)

    def rank(self, r: int):
        ranks = self

        class Rank:
            world_size = ranks.world

            rank = r

            def gather_values(self, values, what=""):
                ranks.barrier.wait()
                ranks.slots[r] = values
                ranks.barrier.wait()
                every = list(ranks.slots)
                ranks.barrier.wait()
                return every
        return Rank()


@pytest.mark.parametrize("coarse", [False, True])
@pytest.mark.parametrize("hint", [None, 0.5, 1e9, 1e-9])
def test_global_batch_topk_equals_the_selection_on_the_whole_batch(hint, coarse):
    """Candidates above the hint when they suffice, else each rank's own top: either way
    the global top k * B (a hint too high falls back, never changes the result). With
    coarse values (as bf16 scores are) ties at the cut are shared out: exactly k * B kept."""
    torch.manual_seed(0)
    world, B, F_, k = 3, 12, 64, 5
    scores_BF = torch.randn(B, F_).relu()
    if coarse:
        scores_BF = (scores_BF * 4).round() / 4
    n_keep = k * B
    cut = torch.topk(scores_BF.reshape(-1), n_keep).values.min()
    ranks = _ThreadRanks(world)
    found: list = [None] * world
    part = B // world

    def run(r):
        rows = scores_BF[r * part:(r + 1) * part]
        t, f = global_batch_topk(rows, n_keep, hint, ranks.rank(r))
        found[r] = [(int(a) + r * part, int(b)) for a, b in zip(t, f)]

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    kept = [entry for entries in found for entry in entries]
    assert len(kept) == len(set(kept)) == n_keep
    above = {(int(t), int(f)) for t, f in torch.nonzero(scores_BF > cut)}
    assert above <= set(kept) and all(scores_BF[t, f] >= cut for t, f in kept)
    if not coarse:  # no ties: the very same entries as one process's selection
        token, latent = batch_topk(scores_BF, n_keep)
        assert set(kept) == {(int(t), int(f)) for t, f in zip(token, latent)}


def test_resume_note_says_what_another_number_of_processes_changes():
    cfg = CrosscoderConfig(n_sources=2, d_model=16, dict_size=64, activation="batchtopk", k=4)
    source = TensorSource(torch.randn(256, 2, 16))
    dp = DataParallel(0, 4, 0, torch.device("cpu"), timeout=None)

    def note(scope: str) -> str:
        tc = TrainConfig(batch_size=128, progress=False, batchtopk_scope=scope, screen="off")
        trainer = Trainer(Crosscoder(cfg), source, tc, run_dir="run", dp=dp)
        trainer.step = 30
        return trainer._resume_note({"mode": "data", "world_size": 2})

    assert note("global") == (
        "resuming run at step 30 on 4 data-parallel processes instead of 2 data-parallel "
        "processes: each now reads 32 of the 128 rows of every global batch (the same "
        "batches as before); the result is the same up to floating-point rounding")
    assert note("local").endswith(
        "BatchTopK now selects 4 x 32 entries per process instead of 4 x 64: training "
        "continues differently than it would have")
