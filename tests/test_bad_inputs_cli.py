"""Bad input through every entry point: one ``error: ...`` line that names the fix, exit
code 2, nothing earlier damaged; unexpected errors as one line plus a traceback log; and
files written with the permissions the umask asks for. (The same through ``python -m
crosscoders``: test_cli_entry.py.)"""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import crosscoders.cli as cli
from crosscoders import Crosscoder, CrosscoderConfig
from crosscoders.cli import bench as cli_bench
from crosscoders.cli import init as cli_init
from crosscoders.cli import main
from crosscoders.cli import train as cli_train
from crosscoders.configs import read_config_file
from crosscoders.data import load_activation_file
from crosscoders.diff.run import DiffConfig, run_diff
from crosscoders.diff.similarity import similarity_matrix
from crosscoders.errors import ConfigError, CrosscodersError, DataError
from crosscoders.formats import import_crosscoder
from crosscoders.pipeline import PipelineConfig
from crosscoders.store import ActivationStore, ShardMeta, StoreWriter
from crosscoders.store import format as fmt

S, D, T = 2, 8, 8  # sources, d_model, context length


# ------------------------------------------------------------------------------ fixtures


def _store(path: Path, data_NSD: np.ndarray) -> Path:
    """An activation store of ``data_NSD`` (one shard, contexts of T tokens)."""
    n = len(data_NSD)
    writer = StoreWriter(path, {"test": 1}, n_sources=S, d_model=D, dtype="float32")
    rows = np.zeros(n, fmt.ROW_DTYPE)
    index = np.arange(n)
    rows["token"], rows["context"], rows["position"] = index % 50, index // T, index % T
    rows["doc"], rows["doc_pos"] = index // T, index % T
    contexts = (np.arange(n) % 50).reshape(-1, T).astype(np.int32)
    meta = ShardMeta(rows, contexts, 0, n // T, {"bos": 0})
    acts = {s: fmt.to_storage(torch.from_numpy(data_NSD[:, s]), "float32") for s in range(S)}
    writer.commit(0, "m", acts, meta)
    writer.end(1, n)
    writer.finalize({"sources": [{"name": f"src{s}"} for s in range(S)], "eval_tokens": 0})
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """Good inputs (activations, a crosscoder, a store) and damaged copies of them."""
    root = tmp_path_factory.mktemp("bad_inputs")
    acts_NSD = torch.randn(64, S, D, generator=torch.Generator().manual_seed(0))
    torch.save(acts_NSD, root / "acts.pt")
    model = Crosscoder(CrosscoderConfig(n_sources=S, d_model=D, dict_size=16, k=4))
    model.save(root / "cc")
    shutil.copytree(root / "cc", root / "cc_truncated")
    weights = root / "cc_truncated" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:40])
    rng = np.random.default_rng(0)
    random = rng.integers(0, 256, 4096, dtype=np.uint8).tobytes()
    for suffix in (".pt", ".safetensors", ".npy"):
        (root / f"random{suffix}").write_bytes(random)
    torch.save([1, 2, 3], root / "list.pt")
    _store(root / "store", rng.standard_normal((64, S, D)).astype(np.float32))
    nan = rng.standard_normal((64, S, D)).astype(np.float32)
    nan[5:9] = np.nan
    _store(root / "nan_store", nan)
    (root / "a_file").write_text("keep me\n")
    (root / "bad.yaml").write_text("train:\n  steps: [1, 2\n  lr: }\n")
    return {"root": root, "acts": acts_NSD, "model": model}


def _one_error(err: str) -> str:
    """The single stderr line, which must be an ``error:`` line and no traceback."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def _fails(capsys, argv: list[str], *fix: str) -> str:
    """Run ``argv`` in-process: exit code 2, one error line naming each of ``fix``."""
    code = main(argv)
    line = _one_error(capsys.readouterr().err)
    assert code == 2, line
    for word in fix:
        assert word in line, line
    return line


def _same_model(path: Path, model: Crosscoder) -> None:
    loaded = Crosscoder.load(path)
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name


# ------------------------------------------------------------------------ damaged files


@pytest.mark.parametrize("suffix,kind", [(".pt", "torch file"), (".safetensors", "safetensors"),
                                         (".npy", ".npy")])
def test_random_bytes_as_training_data(world, capsys, suffix, kind):
    root = world["root"]
    line = _fails(capsys, ["train", "--data", str(root / f"random{suffix}"),
                           "--out", str(root / "run_random"), "--steps", "2"],
                  f"random{suffix}", kind, "write it again")
    assert not (root / "run_random" / "model.safetensors").exists(), line
    with pytest.raises(DataError, match=f"could not be read as .*{kind}"):
        load_activation_file(root / f"random{suffix}")


def test_data_file_messages_name_the_fix(world, capsys):
    root = world["root"]
    _fails(capsys, ["train", "--data", str(root / "list.pt"), "--out", str(root / "r")],
           "holds a list", "torch.save(acts_NSD, path)")
    _fails(capsys, ["train", "--data", str(root / "nope.pt"), "--out", str(root / "r")],
           "does not exist", "check the path")


def test_truncated_crosscoder(world, capsys):
    root = world["root"]
    for argv in (["diff", str(root / "cc_truncated"), "--store", str(root / "store"),
                  "--out", str(root / "diff_truncated"), "--no-progress"],
                 ["layers", str(root / "cc_truncated"), "--out", str(root / "layers_trunc")],
                 ["import", str(root / "cc_truncated"), "--out", str(root / "imported")]):
        _fails(capsys, argv, "model.safetensors", "could not be read as safetensors",
               "save it again")
    with pytest.raises(CrosscodersError, match="model.safetensors could not be read"):
        Crosscoder.load(root / "cc_truncated")
    with pytest.raises(CrosscodersError, match="could not be read"):
        import_crosscoder(root / "cc_truncated")
    _same_model(root / "cc", world["model"])  # the good one is untouched


def test_crosscoder_directory_messages(world, capsys, tmp_path):
    _fails(capsys, ["diff", str(tmp_path / "typo"), "--store", str(world["root"] / "store"),
                    "--out", str(tmp_path / "d")], "no crosscoder directory", "check the path")
    broken = tmp_path / "broken"
    shutil.copytree(world["root"] / "cc", broken)
    (broken / "config.json").write_text("{not json")
    with pytest.raises(CrosscodersError, match="config.json could not be read as JSON.*save"):
        Crosscoder.load(broken)


def test_nan_store_is_refused_before_any_svd(world, capsys):
    root = world["root"]
    line = _fails(capsys, ["diff", str(root / "cc"), "--store", str(root / "nan_store"),
                           "--out", str(root / "diff_nan"), "--no-progress"],
                  str(root / "nan_store"), "harvest again")
    assert "non-finite" in line or "NaN" in line
    assert not (root / "diff_nan" / "similarity.json").exists()
    nan = world["acts"].clone()
    nan[3, 1, 2] = float("inf")
    with pytest.raises(DataError, match="non-finite values.*first at row 3"):
        run_diff(world["model"], nan, root / "diff_nan_api", DiffConfig(progress=False))
    with pytest.raises(DataError, match="non-finite"):
        similarity_matrix(nan, [0], [1], progress=False)
    ActivationStore.open(root / "store")  # the good store still opens


def test_constant_activations_give_nan_similarity_not_a_crash():
    ones = torch.ones(32, S, D)
    sim = similarity_matrix(ones, [0], [1], progress=False)
    assert np.isnan(sim["cka"]).all() and np.isnan(sim["svcca"]).all()


# ------------------------------------------------------------------------ paths in the way


def test_out_pointing_at_a_file(world, capsys):
    root = world["root"]
    a_file = root / "a_file"
    for argv in (["train", "--data", str(root / "acts.pt"), "--out", str(a_file)],
                 ["diff", str(root / "cc"), "--store", str(root / "store"), "--out", str(a_file)],
                 ["layers", str(root / "cc"), "--out", str(a_file)],
                 ["import", str(root / "cc"), "--out", str(a_file)],
                 ["demo", "--out", str(a_file)],
                 ["harvest", "--base", "b", "--chat", "c", "--data", "x.txt", "--out",
                  str(a_file)]):
        _fails(capsys, argv, str(a_file), "is a file, not a directory")
    for argv in (["init", "--out", str(a_file / "cfg.yaml")],
                 ["bench", "synthetic", "--steps", "1", "--json", str(a_file / "r.json")],
                 ["report", str(root / "cc"), "--out", str(a_file / "r.html")]):
        _fails(capsys, argv, str(a_file), "choose another path")
    _fails(capsys, ["init", "--out", str(root), "--force"], "is a directory", "file path")
    assert a_file.read_text() == "keep me\n"
    with pytest.raises(CrosscodersError, match="is a file, not a directory"):
        world["model"].save(a_file)
    assert a_file.read_text() == "keep me\n"


# ------------------------------------------------------------------------ config files


def test_config_files(world, capsys, tmp_path):
    root = world["root"]
    acts = str(root / "acts.pt")
    run = tmp_path / "earlier_run"
    shutil.copytree(root / "cc", run)
    _fails(capsys, ["train", "--data", acts, "--out", str(run), "--config",
                    str(root / "bad.yaml")], "not valid YAML")
    _same_model(run, world["model"])  # an earlier run is untouched
    _fails(capsys, ["train", "--data", acts, "--out", str(tmp_path / "r"), "--config",
                    str(tmp_path / "missing.yaml")], "does not exist", "crosscoders init")
    for argv in (["train", "--data", acts, "--out", str(tmp_path / "r"), "--config",
                  str(root / "bad.yaml")],
                 ["run", str(root / "bad.yaml")],
                 ["harvest", "--config", str(root / "bad.yaml"), "--out", str(tmp_path / "h")],
                 ["diff", str(root / "cc"), "--store", str(root / "store"), "--out",
                  str(tmp_path / "d"), "--config", str(root / "bad.yaml")]):
        _fails(capsys, argv, "bad.yaml is not valid YAML", "line 3", "fix the syntax")
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n- 2\n")
    _fails(capsys, ["train", "--data", acts, "--out", str(tmp_path / "r"), "--config",
                    str(listed)], "holds a list", "key: value")
    broken_json = tmp_path / "cfg.json"
    broken_json.write_text('{"steps": 3,}')
    with pytest.raises(ConfigError, match="not valid JSON .*line 1"):
        read_config_file(broken_json)
    with pytest.raises(ConfigError, match="not valid YAML"):
        PipelineConfig.load(root / "bad.yaml")
    assert not (tmp_path / "r").exists()  # refused before any work


def test_key_path_is_not_glued_onto_the_message(tmp_path, capsys):
    config = tmp_path / "gelu.yaml"
    config.write_text("harvest:\n  models: [{path: a}, {path: b}]\n  data: [{path: x.txt}]\n"
                      "crosscoder:\n  activation: gelu\n")
    line = _fails(capsys, ["run", str(config)])
    assert ("crosscoder.activation: unknown activation 'gelu'; choose one of relu, topk, "
            "batchtopk, jumprelu") in line
    with pytest.raises(ConfigError, match=r"^train.steps: expected an integer"):
        from crosscoders import TrainConfig

        TrainConfig.from_dict({"steps": "many"}, _path="train")
    with pytest.raises(ConfigError, match=r"^crosscoder.k must be between"):
        CrosscoderConfig.from_dict({"n_sources": 2, "d_model": 4, "dict_size": 8, "k": 9},
                                   _path="crosscoder")
    with pytest.raises(ConfigError, match=r"missing key crosscoder.dict_size"):
        CrosscoderConfig.from_dict({"n_sources": 2, "d_model": 4}, _path="crosscoder")


def test_flags_with_impossible_values(world, capsys, tmp_path):
    root = world["root"]
    if not torch.cuda.is_available():
        _fails(capsys, ["diff", str(root / "cc"), "--store", str(root / "store"), "--out",
                        str(tmp_path / "d"), "--device", "cuda", "--no-progress"],
               "CUDA is not available", "--device cpu")
    _fails(capsys, ["report", str(root / "cc"), "--max-examples", "-1"], "must be >= 0")
    _fails(capsys, ["bench", "layers", "--layers", "0"], "--layers must be >= 1")
    _fails(capsys, ["report", str(root / "cc"), "--tokenizer", str(tmp_path / "no_tok")],
           "could not load the tokenizer", "Hub id")
    _fails(capsys, ["import", str(root / "cc"), "--format", "kissane", "--out",
                    str(tmp_path / "i")], "expected cc_weights.pt", "--format auto")


def test_harvest_weights_message_names_the_fix(capsys, tmp_path):
    _fails(capsys, ["harvest", "--base", "b", "--chat", "c", "--data", "x.txt", "--weights",
                    "1", "2", "--out", str(tmp_path / "h")],
           "--weights has 2 values for 1 --data paths", "one weight per --data path")


# ------------------------------------------------------------------------ harvest end to end


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from crosscoders.testing import make_model, make_tokenizer, write_text_corpus

    root = tmp_path_factory.mktemp("pair")
    tok = make_tokenizer()
    make_model(root / "base", "llama", seed=0, tokenizer=tok)
    make_model(root / "chat", "llama", seed=1, tokenizer=tok)
    write_text_corpus(root / "text.jsonl", 60, seed=0)
    return root


def test_harvest_exits_0_and_a_changed_config_names_the_field(pair, tmp_path, capsys):
    out = tmp_path / "store"
    argv = ["harvest", "--base", str(pair / "base"), "--chat", str(pair / "chat"),
            "--data", str(pair / "text.jsonl"), "--tokens", "200", "--context-length", "16",
            "--batch-size", "4", "--shard-tokens", "100", "--device", "cpu",
            "--store-dtype", "float32", "--out", str(out), "--no-progress"]
    assert main([*argv, "--layers", "1"]) == 0
    assert "tokens x 2 sources" in capsys.readouterr().out
    before = ActivationStore.open(out).rows(0, 50)
    line = _fails(capsys, [*argv, "--layers", "0"], "config.models[0].sites[0]: '1' in the "
                  "store, '0' now", "new --out directory")
    assert "differs in: config;" not in line
    assert torch.equal(ActivationStore.open(out).rows(0, 50), before)  # store intact


# ------------------------------------------------------------------------ unexpected errors


def _boom(args):
    raise RuntimeError("boom\nsecond line")


def test_unexpected_error_is_one_line_and_a_log_in_the_output_dir(world, tmp_path, capsys,
                                                                   monkeypatch):
    monkeypatch.setattr(cli_train, "run", _boom)
    out = tmp_path / "run"
    out.mkdir()
    code = main(["train", "--data", str(world["root"] / "acts.pt"), "--out", str(out)])
    line = _one_error(capsys.readouterr().err)
    log = out / cli.ERROR_LOG
    assert code == 1
    assert line == f"error: unexpected RuntimeError: boom; full traceback in {log}"
    text = log.read_text()
    assert "Traceback (most recent call last)" in text and "second line" in text
    assert "crosscoders train --data" in text  # the command that failed


def test_unexpected_error_without_output_dir_logs_to_a_temp_file(tmp_path, capsys,
                                                                 monkeypatch):
    monkeypatch.setattr(cli_bench, "run_synthetic", _boom)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert main(["bench", "synthetic"]) == 1
    line = _one_error(capsys.readouterr().err)
    logs = list(tmp_path.glob("crosscoders-error-*.log"))
    assert len(logs) == 1 and line.endswith(f"full traceback in {logs[0]}")
    assert "RuntimeError: boom" in logs[0].read_text()


def test_os_errors_on_user_paths_are_named(tmp_path, capsys, monkeypatch):
    def denied(args):
        raise PermissionError(13, "Permission denied", str(tmp_path / "x"))

    monkeypatch.setattr(cli_init, "run", denied)
    _fails(capsys, ["init", "--out", str(tmp_path / "x")], str(tmp_path / "x"),
           "Permission denied", "fix its permissions")


# ------------------------------------------------------------------------ file modes


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_follow_the_umask(world, tmp_path, capsys, umask, mode):
    old = os.umask(umask)
    try:
        world["model"].save(tmp_path / "cc")
        _store(tmp_path / "store", np.random.default_rng(1).standard_normal(
            (16, S, D)).astype(np.float32))
        assert main(["init", "--out", str(tmp_path / "cfg.yaml")]) == 0
        assert main(["diff", str(tmp_path / "cc"), "--store", str(tmp_path / "store"),
                     "--out", str(tmp_path / "diff"), "--no-progress"]) == 0
        assert main(["report", str(tmp_path / "diff")]) == 0
    finally:
        os.umask(old)
    capsys.readouterr()
    files = [tmp_path / "cc" / "model.safetensors", tmp_path / "cc" / "config.json",
             tmp_path / "cfg.yaml", tmp_path / "diff" / "report.html",
             tmp_path / "diff" / "examples.db", tmp_path / "diff" / "summary.json",
             tmp_path / "store" / "manifest.json",
             *(tmp_path / "store").glob("shards/*/acts_0.npy")]
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == mode, path
    assert not list(tmp_path.rglob(".*.tmp"))  # no temporary files left behind
    # what was written is whole and loadable
    _same_model(tmp_path / "cc", world["model"])
    assert set(load_file(str(tmp_path / "cc" / "model.safetensors"))) >= {"W_enc", "W_dec"}
    assert json.loads((tmp_path / "diff" / "summary.json").read_text())["counts"]


def test_diff_of_a_missing_run_names_the_path(world, capsys):
    root = world["root"]
    _fails(capsys, ["diff", str(root / "no_such_run"), "--out", str(root / "diff_missing")],
           "no crosscoder directory at", "no_such_run")
    assert not (root / "diff_missing").exists()
