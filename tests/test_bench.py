"""The bench package: the library never imports it (no bench <-> diff loop), nothing in
the library imports the test fixtures, and every ``crosscoders bench`` command runs end to
end at tiny size through the CLI."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from crosscoders.cli import main

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "crosscoders"
LIBRARY = ["crosscoders", "crosscoders.diff", "crosscoders.train", "crosscoders.model",
           "crosscoders.harvest", "crosscoders.report", "crosscoders.pipeline",
           "crosscoders.organism"]
BENCH = ["crosscoders.bench.planted", "crosscoders.bench.synthetic",
         "crosscoders.bench.diffing", "crosscoders.bench.layers"]


def _fresh_python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(SRC), os.environ.get("PYTHONPATH")) if p)}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=300)


def _imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, at top level or inside a function."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def test_importing_the_library_loads_no_benchmark_or_fixture():
    code = (f"import importlib, sys\nfor name in {LIBRARY!r}: importlib.import_module(name)\n"
            "print(sorted(m for m in sys.modules if m.startswith(('crosscoders.bench', "
            "'crosscoders.testing'))))")
    run = _fresh_python(code)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"


@pytest.mark.parametrize("first", BENCH)
def test_each_benchmark_imports_first_in_a_fresh_interpreter(first):
    """A benchmark imported before the diffing analysis must not hit a half-initialised
    module, which an import loop between the two would cause."""
    run = _fresh_python(f"import {first}")
    assert run.returncode == 0, run.stderr


def test_only_the_cli_imports_bench_and_nothing_in_the_package_imports_testing():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        imported = _imported_modules(path)
        in_bench, in_cli = rel.parts[0] == "bench", rel.parts[0] in ("cli.py", "cli")
        if not (in_bench or in_cli) and any(m.startswith("crosscoders.bench") for m in imported):
            offenders.append(f"{rel} imports crosscoders.bench")
        if rel.parts[0] != "testing.py" and any(
                m == "crosscoders.testing" or m.startswith("crosscoders.testing.")
                for m in imported):
            offenders.append(f"{rel} imports crosscoders.testing")
    assert offenders == []
    # the check sees what it should: bench modules do import the diffing analysis
    assert "crosscoders.diff.table" in _imported_modules(PACKAGE / "bench" / "diffing.py")


# ------------------------------------------------------------------ the CLI, tiny sizes


def test_bench_synthetic_runs_and_writes_json(tmp_path, capsys):
    out = tmp_path / "synthetic.json"
    assert main(["bench", "synthetic", "--activations", "batchtopk", "--steps", "5",
                 "--dict-size", "32", "--k", "2", "--threads", "1", "--seed", "4",
                 "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "batchtopk" in printed and "recovery" in printed and "seed 4" in printed
    result = json.loads(out.read_text())
    assert result["settings"]["steps"] == 5 and result["settings"]["dict_size"] == 32
    assert result["planted"]["seed"] == 4
    assert list(result["results"]) == ["batchtopk"]
    assert 0.0 <= result["results"]["batchtopk"]["recovery"] <= 1.0


def test_bench_diffing_runs_and_writes_json(tmp_path, capsys):
    cfg = tmp_path / "diffing.yaml"
    cfg.write_text(
        "planted: {d_model: 16, n_shared: 6, n_shared_rotated: 0, n_shared_weaker: 4,\n"
        "          n_base_only: 3, n_chat_only: 3, n_tokens: 4096, fire_prob: 0.05}\n"
        "n_decoupled: 4\ndict_size: 48\nbatch_size: 256\n")
    out = tmp_path / "diffing.json"
    assert main(["bench", "diffing", "--config", str(cfg), "--activations", "relu",
                 "--steps", "5", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Latent Scaling medians" in printed and "shared_decoupled 4" in printed
    result = json.loads(out.read_text())
    assert result["config"]["steps"] == 5 and result["config"]["dict_size"] == 48
    assert result["kinds"]["shared_decoupled"] == 4
    assert list(result["results"]) == ["relu"]


def test_bench_layers_runs_and_writes_json(tmp_path, capsys):
    out = tmp_path / "layers.json"
    assert main(["bench", "layers", "--layers", "2", "--d-model", "8", "--steps", "5",
                 "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "planted features" in printed and "per-layer SAEs" in printed
    result = json.loads(out.read_text())
    assert result["n_layers"] == 2 and result["d_model"] == 8 and result["steps"] == 5
    assert len(result["crosscoder"]) == 6 and len(result["per_layer_saes"]) == 5
