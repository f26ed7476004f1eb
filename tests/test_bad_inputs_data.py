"""Bad data never trains silently and never costs earlier work.

Each test feeds `train` what a user might by mistake (other data in an old run directory,
NaN rows, a corrupted store, a killed checkpoint write) and checks the error names the
problem and the fix, and that the files already in the run directory are untouched.
"""

import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from crosscoders import Crosscoder, CrosscoderConfig, TrainConfig, train
from crosscoders.data import TensorSource, fingerprint
from crosscoders.errors import CrosscodersError, DataError, TrainingDiverged
from crosscoders.store import ActivationStore, ShardMeta, StoreWriter
from crosscoders.store import format as fmt
from crosscoders.train import Trainer
from helpers import planted_acts

S, D, T = 2, 16, 10  # sources, d_model, context length of the tiny stores
FAST = dict(batch_size=64, progress=False, eval_tokens=128, eval_every=4, log_every=2,
            checkpoint_every=4)


def _cfg():
    return CrosscoderConfig(n_sources=S, d_model=D, dict_size=64, k=4)


def _tc(steps=12, **kw):
    return TrainConfig(steps=steps, **{**FAST, **kw})


def _files(run: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(run.iterdir()) if p.is_file()}


def _interrupt(monkeypatch, data, run: Path, steps=12) -> None:
    """Train until the first checkpoint (step 4), then stop as if killed."""
    original = Trainer._save_checkpoint

    def save_then_stop(self):
        original(self)
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "_save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(), data, _tc(steps), run_dir=run)
    monkeypatch.undo()
    assert torch.load(run / "checkpoint.pt", weights_only=False)["step"] == 4
    assert not (run / "model.safetensors").exists()


def _write_store(path: Path, data_NSD: np.ndarray, shard_rows=(60, 60, 80), eval_tokens=0):
    """A finished store holding ``data_NSD`` (float32) in shards of whole contexts."""
    writer = StoreWriter(path, {"test": 1}, n_sources=S, d_model=D, dtype="float32")
    row = 0
    for k, n in enumerate(shard_rows):
        rows = np.zeros(n, fmt.ROW_DTYPE)
        index = np.arange(row, row + n)
        rows["token"], rows["context"], rows["position"] = index % 100, index // T, index % T
        contexts = (np.arange(row, row + n) % 100).reshape(-1, T).astype(np.int32)
        meta = ShardMeta(rows, contexts, row // T, (row + n) // T)
        writer.commit(k, "m", {s: data_NSD[row: row + n, s] for s in range(S)}, meta)
        row += n
    writer.end(len(shard_rows), row)
    writer.finalize({"sources": [{"name": f"src{s}"} for s in range(S)],
                     "eval_tokens": eval_tokens})
    return path


def _store_data(n=200, seed=0) -> np.ndarray:
    return planted_acts(n=n, S=S, D=D, seed=seed)[0].numpy()


# ----------------------------------------------------------------- other data, same shape


def test_finished_run_returns_its_model_on_the_same_data_and_refuses_other_data(tmp_path):
    acts, other = planted_acts(n=1024)[0], planted_acts(n=1024, seed=1)[0]
    first = train(_cfg(), acts, _tc(6), run_dir=tmp_path)
    before = _files(tmp_path)
    again = train(_cfg(), acts, _tc(6), run_dir=tmp_path)  # nothing to do: returned as is
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(),
                                                 again.state_dict().values()))
    assert _files(tmp_path) == before  # not retrained: checkpoint and metrics untouched
    with pytest.raises(CrosscodersError) as err:
        train(_cfg(), other, _tc(6), run_dir=tmp_path)
    message = str(err.value)
    assert "\n" not in message
    assert f"trained on other data: its run.json records an in-memory tensor (1024 tokens) " \
           f"with fingerprint='{fingerprint(acts)}', but this data is an in-memory tensor " \
           f"(1024 tokens) with fingerprint='{fingerprint(other)}'" in message
    assert message.endswith("use another run directory, or the original data to resume it")
    assert _files(tmp_path) == before
    loaded = Crosscoder.load(tmp_path)
    assert torch.equal(loaded.W_dec, first.W_dec)


@pytest.mark.parametrize("kind", ["tensor", ".pt file", ".npy file"])
def test_interrupted_run_on_other_data_is_refused_before_anything_is_written(
    kind, tmp_path, monkeypatch
):
    acts, other = planted_acts(n=1024)[0], planted_acts(n=1024, seed=1)[0]
    path = tmp_path / ("acts.pt" if kind == ".pt file" else "acts.npy")

    def data(x):
        if kind == "tensor":
            return x
        torch.save(x, path) if path.suffix == ".pt" else np.save(path, x.numpy())
        return path  # the same path, holding other data of the same shape

    run = tmp_path / "run"
    _interrupt(monkeypatch, data(acts), run)
    before = _files(run)
    with pytest.raises(CrosscodersError, match=(
        f"fingerprint='{fingerprint(acts)}', but this data is .* with "
        f"fingerprint='{fingerprint(other)}'; use another run directory, or the original data"
    )):
        train(_cfg(), data(other), _tc(), run_dir=run)
    assert _files(run) == before  # checkpoint.pt byte-identical, nothing added

    # the original data resumes the run to the weights of an uninterrupted one
    resumed = train(_cfg(), data(acts), _tc(), run_dir=run)
    reference = train(_cfg(), data(acts), _tc(), run_dir=tmp_path / "reference")
    for (name, a), b in zip(resumed.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(a, b), name


def test_run_without_a_recorded_fingerprint_resumes_and_records_it(tmp_path, monkeypatch):
    acts, other = planted_acts(n=1024)[0], planted_acts(n=1024, seed=1)[0]
    _interrupt(monkeypatch, acts, tmp_path)
    run = json.loads((tmp_path / "run.json").read_text())
    del run["data"]["fingerprint"]  # as written before runs recorded one
    (tmp_path / "run.json").write_text(json.dumps(run))
    train(_cfg(), acts, _tc(), run_dir=tmp_path)  # unknown fingerprint: accepted
    assert json.loads((tmp_path / "run.json").read_text())["data"]["fingerprint"] == \
        fingerprint(acts)
    with pytest.raises(CrosscodersError, match="trained on other data"):
        train(_cfg(), other, _tc(), run_dir=tmp_path)


def test_fingerprint_reads_a_sample_and_sees_any_same_shape_change():
    acts = planted_acts(n=4096)[0]
    assert fingerprint(acts) == fingerprint(acts.clone()) == fingerprint(acts.numpy())
    assert fingerprint(acts) != fingerprint(acts * 1.001)
    assert fingerprint(acts) != fingerprint(acts.double())
    assert fingerprint(acts) != fingerprint(acts[:4095])
    assert fingerprint(acts.bfloat16()) != fingerprint(acts.half())


# ----------------------------------------------------------------- NaN / inf


def test_nan_in_the_held_out_rows_is_refused_before_step_0(tmp_path):
    acts = planted_acts(n=1024)[0]
    eval_rows = TensorSource(acts, n_eval=128).eval_idx
    bad = acts.clone()
    bad[eval_rows[3], 1, 5] = float("nan")  # a row training never sees
    bad[eval_rows[-1], 0, 0] = float("inf")
    bad[eval_rows[-1], 1, 2] = float("-inf")
    run = tmp_path / "run"
    with pytest.raises(DataError, match=(
        rf"^the activation tensor holds 3 NaN or inf value\(s\) in 2 of its 1024 rows, the "
        rf"first at row {int(eval_rows[3])}; drop or fix those rows before training"
    )):
        train(_cfg(), bad, _tc(), run_dir=run)
    assert not run.exists()  # refused before a run directory or checkpoint was written
    with pytest.raises(DataError, match="1 NaN or inf value"):
        train(_cfg(), bad[:, :, :].bfloat16()[eval_rows[:4]], _tc())


def test_nan_file_is_refused_and_the_finished_run_is_kept(tmp_path):
    acts = planted_acts(n=1024)[0]
    path = tmp_path / "acts.npy"
    np.save(path, acts.numpy())
    run = tmp_path / "run"
    train(_cfg(), path, _tc(6), run_dir=run)
    before = _files(run)
    bad = acts.numpy().copy()
    bad[700, 0, 9] = np.nan
    np.save(path, bad)
    with pytest.raises(DataError, match=rf"^{path} holds 1 NaN or inf value\(s\) in 1 of its "
                                        r"1024 rows, the first at row 700; drop or fix"):
        train(_cfg(), path, _tc(6), run_dir=run)
    assert _files(run) == before
    Crosscoder.load(run)


def test_store_with_nan_rows_names_shard_and_row_not_the_learning_rate(tmp_path):
    data = _store_data()
    data[137, 1, 4] = np.nan  # shard 1 holds rows 60..119, shard 2 rows 120..199
    data[150] = np.inf
    store = _write_store(tmp_path / "store", data)
    expected = (rf"^shard 2 of activation store {store} holds {1 + S * D} NaN or inf value\(s\) "
                r"in 2 row\(s\), the first at row 137 of the store \(row 17 of the shard\); the "
                r"model produced non-finite activations: harvest again")
    for normalise in (True, False):
        with pytest.raises(DataError, match=expected):
            train(_cfg(), store, _tc(normalise=normalise), run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_nonfinite_batch_from_an_unchecked_source_says_the_data_is_bad(tmp_path):
    data = _store_data()
    data[3, 0, 0] = np.nan
    store_path = _write_store(tmp_path / "store", data, shard_rows=(200,))
    store = ActivationStore.open(store_path, verify="none")  # every check switched off
    run = tmp_path / "run"
    with pytest.raises(DataError, match=(
        r"^the data holds non-finite values: the batch of step [0-3] from activation store "
        rf"'{store_path.resolve()}' \(200 tokens\) has 1 NaN or inf value\(s\) in 1 row\(s\)"
        r", the first at batch row \d+; no checkpoint had been written yet\. Drop or fix"
    )):
        train(_cfg(), store, _tc(normalise=False, init_b_dec_from_mean=False), run_dir=run)
    assert not (run / "checkpoint.pt").exists()
    for normalise, init_b_dec in ((True, False), (False, True)):
        with pytest.raises(DataError, match=r"^the data holds NaN or inf values: the sample or "
                                            "statistics of activation store .* are not finite"):
            train(_cfg(), store, _tc(normalise=normalise, init_b_dec_from_mean=init_b_dec))
    assert issubclass(TrainingDiverged, CrosscodersError)  # the CLI reports both the same way


# ----------------------------------------------------------------- corrupt store bytes


def _flip_a_mantissa_byte(path: Path, element: int) -> None:
    """Change one float32 of an .npy file, keeping it finite (its lowest mantissa byte)."""
    offset = len(path.read_bytes()) - np.load(path).nbytes
    raw = bytearray(path.read_bytes())
    raw[offset + 4 * element] ^= 0xFF
    path.write_bytes(bytes(raw))
    assert np.isfinite(np.load(path)).all()


@pytest.mark.parametrize("shard", [1, 2])  # shard 2 holds the held-out rows
def test_flipped_shard_bytes_are_caught_on_first_read(shard, tmp_path):
    store = _write_store(tmp_path / "store", _store_data(), eval_tokens=40)
    _flip_a_mantissa_byte(fmt.shard_dir(store, shard) / "acts_0.npy", 123)
    ActivationStore.open(store)  # the quick check at open does not hash activations
    run = tmp_path / "run"
    with pytest.raises(DataError, match=(
        rf"^shard {shard} \(shards/0000{shard}/acts_0.npy\) is corrupt: its sha256 does not "
        r"match the manifest, so it is not what was harvested; restore the file from a copy, "
        r"or harvest again into a new directory$"
    )):
        train(_cfg(), store, _tc(), run_dir=run)
    assert not (run / "checkpoint.pt").exists()


def test_resume_on_a_store_corrupted_since_is_refused_and_keeps_the_checkpoint(
    tmp_path, monkeypatch
):
    store = _write_store(tmp_path / "store", _store_data(), eval_tokens=40)
    run = tmp_path / "run"
    _interrupt(monkeypatch, store, run)
    before = _files(run)
    _flip_a_mantissa_byte(fmt.shard_dir(store, 0) / "acts_1.npy", 7)
    with pytest.raises(DataError, match=r"shard 0 \(shards/00000/acts_1.npy\) is corrupt"):
        train(_cfg(), store, _tc(), run_dir=run)
    assert _files(run)["checkpoint.pt"] == before["checkpoint.pt"]


def test_each_shard_is_hashed_once_per_run(tmp_path, monkeypatch):
    store = _write_store(tmp_path / "store", _store_data(), eval_tokens=40)
    hashed = []
    original = fmt.sha256_file
    monkeypatch.setattr(fmt, "sha256_file", lambda path: hashed.append(path.name)
                        or original(path))
    train(_cfg(), store, _tc(40))  # many epochs of 160 training rows
    assert sorted(n for n in hashed if n.startswith("acts_")) == ["acts_0.npy"] * 3 + \
        ["acts_1.npy"] * 3
    hashed.clear()
    train(_cfg(), ActivationStore.open(store, verify="none"), _tc(4))
    assert hashed == []  # verify="none" really checks nothing


# ----------------------------------------------------------------- killed checkpoint writes


KILLED_WRITE = textwrap.dedent("""
    import sys, time
    from crosscoders.io import atomic_write

    def write(tmp):
        with open(tmp, "wb") as handle:
            handle.write(b"half a checkpoint" * 1000)
        print("writing", flush=True)
        time.sleep(60)

    atomic_write(sys.argv[1], write)
""")


def test_resume_removes_temporaries_of_a_killed_checkpoint_write_only(tmp_path, monkeypatch):
    acts = planted_acts(n=1024)[0]
    _interrupt(monkeypatch, acts, tmp_path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).parents[1] / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITE, str(tmp_path / "checkpoint.pt")],
                            stdout=subprocess.PIPE, env=env)
    assert proc.stdout.readline() == b"writing\n"
    os.kill(proc.pid, signal.SIGKILL)  # killed inside the write, before the rename
    proc.wait()
    fd, other_tmp = tempfile.mkstemp(dir=tmp_path, prefix=".model.safetensors.", suffix=".tmp")
    os.close(fd)
    stale = sorted(p.name for p in tmp_path.glob(".*.tmp"))
    assert len(stale) == 2 and any(n.startswith(".checkpoint.pt.") for n in stale)
    users = {"notes.txt": b"mine", ".mine.tmp": b"also mine", "checkpoint.pt.tmp": b"mine too",
             ".checkpoint.pt.tmp": b"not atomic_write's pattern"}
    for name, content in users.items():
        (tmp_path / name).write_bytes(content)
    train(_cfg(), acts, _tc(), run_dir=tmp_path)
    assert not any((tmp_path / n).exists() for n in stale)
    assert all((tmp_path / n).read_bytes() == c for n, c in users.items())
    assert set(load_file(str(tmp_path / "model.safetensors"))) >= {"W_dec", "W_enc"}


@pytest.mark.parametrize("damaged", ["run.json", "checkpoint.pt"])
def test_damaged_run_files_give_a_clear_error_and_stay(tmp_path, monkeypatch, damaged):
    acts, _ = planted_acts(n=512)
    run = tmp_path / "run"
    _interrupt(monkeypatch, acts, run)
    (run / damaged).write_bytes(b"\x00 not what was written \xff")
    before = _files(run)
    with pytest.raises(CrosscodersError, match=damaged.replace(".", r"\.")):
        train(_cfg(), acts, _tc(), run_dir=run)
    assert _files(run) == before
