"""`crosscoders run` deletes nothing it did not write.

A store made by `crosscoders harvest`, a file, a folder of other files or a foreign file inside
a stage directory is refused with the fix named (exit code 2, one `error:` line) and left
byte-identical; `harvest: {store: PATH}` reuses a stand-alone store without writing to it; a
redo that is killed resumes instead of mixing old and new output.
"""

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import yaml

from crosscoders.cli import main as cli_main
from crosscoders.errors import CrosscodersError
from crosscoders.pipeline.stages import STAGE_DIR, run_stage

# ------------------------------------------------------------------ shared fixtures


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A tiny two-layer model, its text, and a store made by the stand-alone harvest."""
    from crosscoders.harvest import harvest
    from crosscoders.harvest.config import HarvestConfig
    from crosscoders.testing import make_model, make_tokenizer, write_text_corpus

    root = tmp_path_factory.mktemp("lab")
    make_model(root / "lm", "llama", tokenizer=make_tokenizer(), d_model=16, n_layers=2)
    write_text_corpus(root / "text.jsonl", 60)
    # what `crosscoders harvest --model lm=... --sites 0 1 --out store` does
    harvest(HarvestConfig.from_dict(harvest_section(root)), root / "store", progress=False)
    return root


def harvest_section(lab):
    return {"models": [{"path": str(lab / "lm"), "name": "lm", "sites": ["0", "1"]}],
            "data": [{"path": str(lab / "text.jsonl")}], "tokens": 600, "context_length": 16,
            "batch_size": 8, "store_dtype": "float32", "device": "cpu", "eval_tokens": 0.1}


def write_config(path: Path, out: Path, harvest: dict, threshold: float = 0.5) -> Path:
    config = {
        "out": str(out), "harvest": harvest,
        "crosscoder": {"activation": "relu", "expansion": 2},
        "train": {"steps": 8, "batch_size": 64, "eval_tokens": 64, "norm_sample_tokens": 256,
                  "device": "cpu", "progress": False},
        "layers": {"threshold": threshold, "max_tokens": 400},
    }
    path.write_text(yaml.safe_dump(config))
    return path


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` (or ``root`` itself if a file) with its bytes."""
    if root.is_file():
        return {".": root.read_bytes()}
    return {p.relative_to(root).as_posix(): p.read_bytes() if p.is_file() else None
            for p in sorted(root.rglob("*"))}


def outputs(out: Path) -> dict[str, bytes | None]:
    """:func:`snapshot` of an experiment directory less ``pipeline.yaml``, the run's copy of
    its config, which every run rewrites."""
    return {k: v for k, v in snapshot(out).items() if k != "pipeline.yaml"}


def run(config: Path, capsys) -> tuple[int, str, str]:
    code = cli_main(["run", str(config), "--no-progress"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def statuses(stdout: str) -> dict[str, str]:
    """Stage -> status from the summary's ``  NAME  STATUS  DIRECTORY`` lines."""
    return dict(m.groups() for m in re.finditer(r"^  (\w+) +(\w+) +/", stdout, re.M))


def refused(config: Path, capsys) -> str:
    """Run, expect the one-line refusal, return it."""
    code, _, err = run(config, capsys)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.fixture(scope="module")
def reused(lab, tmp_path_factory):
    """An experiment that reused ``lab/store`` through ``harvest.store`` (run once)."""
    root = tmp_path_factory.mktemp("reused")
    config = write_config(root / "exp.yaml", root / "exp", {"store": str(lab / "store")})
    before = snapshot(lab / "store")
    assert cli_main(["run", str(config), "--no-progress"]) == 0
    assert snapshot(lab / "store") == before  # read, never written
    return root / "exp"


# ------------------------------------------------------------------ foreign output directories


def test_store_made_by_harvest_in_out_is_refused_not_deleted(lab, tmp_path, capsys):
    out = tmp_path / "exp"
    shutil.copytree(lab / "store", out / "store")
    before = snapshot(out)
    line = refused(write_config(tmp_path / "c.yaml", out, harvest_section(lab)), capsys)
    assert f"harvest: {{store: {out / 'store'}}}" in line and "new or empty directory" in line
    assert snapshot(out) == before

    # out itself is the store
    shutil.rmtree(out)
    shutil.copytree(lab / "store", out)
    before = snapshot(out)
    line = refused(tmp_path / "c.yaml", capsys)
    assert f"harvest: {{store: {out}}}" in line
    assert snapshot(out) == before


def test_store_made_by_harvest_in_an_experiment_dir_is_refused(lab, tmp_path, capsys):
    """An experiment directory (stages/ present) whose store/ has no stage record."""
    out = tmp_path / "exp"
    (out / STAGE_DIR).mkdir(parents=True)
    shutil.copytree(lab / "store", out / "store")
    before = snapshot(out)
    line = refused(write_config(tmp_path / "c.yaml", out, harvest_section(lab)), capsys)
    assert f"harvest: {{store: {out / 'store'}}}" in line and "did not make" in line
    assert snapshot(out) == before


def test_out_that_is_a_file_or_an_unrelated_folder_is_refused(lab, tmp_path, capsys):
    out = tmp_path / "notes.txt"
    out.write_text("my notes\n")
    line = refused(write_config(tmp_path / "c.yaml", out, harvest_section(lab)), capsys)
    assert "is a file" in line and "out:" in line
    assert out.read_text() == "my notes\n"

    home = tmp_path / "home"
    (home / "docs").mkdir(parents=True)
    (home / "docs" / "thesis.tex").write_text("\\section{}")
    (home / ".bashrc").write_text("alias ll='ls -l'\n")
    (home / "crosscoder").mkdir()  # even a name the pipeline uses
    (home / "crosscoder" / "mine.txt").write_text("mine")
    before = snapshot(home)
    line = refused(write_config(tmp_path / "c.yaml", home, harvest_section(lab)), capsys)
    assert "is not empty" in line and "not made by `crosscoders run`" in line
    assert "new or empty directory" in line
    assert snapshot(home) == before  # not even pipeline.yaml or stages/ written


def test_foreign_stage_directory_in_an_experiment_dir_is_refused(lab, reused, tmp_path, capsys):
    """A run dir made by the stand-alone `crosscoders train` where the pipeline's would go."""
    out = tmp_path / "exp"
    shutil.copytree(reused, out)
    shutil.rmtree(out / "crosscoder")
    (out / STAGE_DIR / "train.json").unlink()
    (out / "crosscoder").mkdir()
    (out / "crosscoder" / "run.json").write_text("{}")
    before = outputs(out)
    line = refused(write_config(tmp_path / "c.yaml", out, {"store": str(lab / "store")}), capsys)
    assert str(out / "crosscoder") in line and "move it away" in line
    assert outputs(out) == before

    (out / STAGE_DIR / "notes.txt").write_text("x")  # stages/ holds only the run's records
    line = refused(tmp_path / "c.yaml", capsys)
    assert "notes.txt" in line and "is not a stage record" in line


# ------------------------------------------------------------------ harvest.store


def test_harvest_store_reuses_a_store_without_harvesting(lab, reused, tmp_path, capsys):
    assert not (reused / "store").exists()  # nothing harvested
    assert not (reused / STAGE_DIR / "harvest.json").exists()
    assert (reused / "crosscoder" / "model.safetensors").exists()
    assert (reused / "layers" / "summary.json").exists()
    run_json = json.loads((reused / "crosscoder" / "run.json").read_text())
    assert run_json["data"]["path"] == str((lab / "store").resolve())

    out = tmp_path / "exp"
    shutil.copytree(reused, out)
    config = write_config(tmp_path / "c.yaml", out, {"store": str(lab / "store")})
    code, stdout, _ = run(config, capsys)
    assert code == 0
    assert statuses(stdout) == {"harvest": "reused", "train": "skipped", "layers": "skipped"}

    # models given beside store: the same weights and sites are accepted, nothing redone
    models = harvest_section(lab)["models"]
    write_config(config, out, {"store": str(lab / "store"), "models": models})
    code, stdout, err = run(config, capsys)
    assert code == 0, err
    assert statuses(stdout) == {"harvest": "reused", "train": "skipped", "layers": "skipped"}


def test_harvest_store_checks_compatibility_and_unused_keys(lab, tmp_path, capsys):
    out = tmp_path / "exp"
    wrong = [{"path": str(lab / "lm"), "name": "lm", "sites": ["0"]}]
    config = write_config(tmp_path / "c.yaml", out, {"store": str(lab / "store"),
                                                     "models": wrong})
    line = refused(config, capsys)
    assert "harvest.store:" in line and "lm/resid_out:1" in line and "harvest.models" in line

    write_config(config, out, {"store": str(lab / "store"), "tokens": 10})
    line = refused(config, capsys)
    assert "harvest.tokens: not used with store" in line

    write_config(config, out, {"store": str(tmp_path / "nowhere")})
    line = refused(config, capsys)
    assert "harvest.store:" in line and "not an activation store" in line


# ------------------------------------------------------------------ inside owned stage directories


def test_foreign_file_inside_a_stage_dir_blocks_its_redo_only(lab, reused, tmp_path, capsys):
    out = tmp_path / "exp"
    shutil.copytree(reused, out)
    (out / "layers" / "my_plot.png").write_bytes(b"\x89PNG mine")
    config = write_config(tmp_path / "c.yaml", out, {"store": str(lab / "store")})
    code, stdout, _ = run(config, capsys)  # unchanged: skipped, the file stays
    assert code == 0 and statuses(stdout)["layers"] == "skipped"

    write_config(config, out, {"store": str(lab / "store")}, threshold=0.3)
    before = outputs(out)
    line = refused(config, capsys)
    assert str(out / "layers" / "my_plot.png") in line and "move it out of" in line
    assert outputs(out) == before

    (out / "layers" / "my_plot.png").rename(tmp_path / "my_plot.png")
    code, stdout, err = run(config, capsys)
    assert code == 0, err
    assert statuses(stdout) == {"harvest": "reused", "train": "skipped", "layers": "redone"}
    assert not list((out / STAGE_DIR).glob("*.discarded"))


# ------------------------------------------------------------------ run_stage units


def _work(directory):
    (directory / "out.txt").write_text("new")
    return "done"


def test_stage_dir_without_record_is_refused_unless_empty(tmp_path):
    stage_dir = tmp_path / "s"
    (stage_dir / "sub").mkdir(parents=True)
    (stage_dir / "sub" / "yours.txt").write_text("keep")
    with pytest.raises(CrosscodersError, match="was not written by `crosscoders run`"):
        run_stage("s", stage_dir, {"a": 1}, [], _work, lambda m: None)
    assert (stage_dir / "sub" / "yours.txt").read_text() == "keep"
    assert not (tmp_path / STAGE_DIR / "s.json").exists()

    empty = tmp_path / "e"
    empty.mkdir()
    assert run_stage("e", empty, {"a": 1}, [], _work, lambda m: None).status == "ran"

    a_file = tmp_path / "f"
    a_file.write_text("a file")
    with pytest.raises(CrosscodersError):
        run_stage("f", a_file, {"a": 1}, [], _work, lambda m: None)
    assert a_file.read_text() == "a file"


def test_killed_redo_resumes_and_never_mixes_old_and_new(tmp_path):
    stage_dir = tmp_path / "s"
    run_stage("s", stage_dir, {"a": 1}, [], _work, lambda m: None)
    record = json.loads((tmp_path / STAGE_DIR / "s.json").read_text())
    assert record["complete"] and record["files"] == ["out.txt"]

    def killed(directory):
        assert list(directory.iterdir()) == []  # the redo starts from an empty directory
        (directory / "half.txt").write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_stage("s", stage_dir, {"a": 2}, [], killed, lambda m: None)
    record = json.loads((tmp_path / STAGE_DIR / "s.json").read_text())
    assert record["config"] == {"a": 2} and not record["complete"]
    seen = []
    outcome = run_stage("s", stage_dir, {"a": 2}, [],
                        lambda d: seen.append(sorted(p.name for p in d.iterdir())), lambda m: None)
    assert outcome.status == "resumed" and seen == [["half.txt"]]


def test_redo_killed_between_discarding_and_recording(tmp_path):
    """The old output was renamed aside, then the process died: nothing half-done remains."""
    stage_dir = tmp_path / "s"
    run_stage("s", stage_dir, {"a": 1}, [], _work, lambda m: None)
    discarded = tmp_path / STAGE_DIR / "s.discarded"
    os.rename(stage_dir, discarded)
    log = []
    outcome = run_stage("s", stage_dir, {"a": 1}, [], _work, log.append)
    assert outcome.status == "ran" and "missing" in log[-1] and not discarded.exists()
    os.rename(stage_dir, discarded)
    outcome = run_stage("s", stage_dir, {"a": 2}, [], _work, log.append)
    assert outcome.status == "redone" and not discarded.exists()
    assert (stage_dir / "out.txt").read_text() == "new"


def test_redo_refuses_links_and_trusts_records_without_a_file_list(tmp_path):
    target = tmp_path / "elsewhere"
    target.mkdir()
    link = tmp_path / "s"
    link.symlink_to(target)
    run_stage("s", link, {"a": 1}, [], _work, lambda m: None)
    with pytest.raises(CrosscodersError, match="link or a file"):
        run_stage("s", link, {"a": 2}, [], _work, lambda m: None)
    assert (target / "out.txt").read_text() == "new" and link.is_symlink()

    # a record from before file lists were kept vouches for its whole directory
    stage_dir = tmp_path / "t"
    run_stage("t", stage_dir, {"a": 1}, [], _work, lambda m: None)
    path = tmp_path / STAGE_DIR / "t.json"
    record = json.loads(path.read_text())
    del record["files"]
    path.write_text(json.dumps(record))
    (stage_dir / "extra.txt").write_text("x")
    assert run_stage("t", stage_dir, {"a": 2}, [], _work, lambda m: None).status == "redone"
    assert sorted(p.name for p in stage_dir.iterdir()) == ["out.txt"]
