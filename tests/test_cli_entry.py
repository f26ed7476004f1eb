"""Every ``crosscoders`` subcommand through both entry points: in-process through
``crosscoders.cli.main([...])`` and as ``python -m crosscoders ...``, checking the exit code
and what it wrote; every flag of today's parser kept; a bad flag is one ``error:`` line and
exit code 2. The commands other tests already run through ``main`` (harvest, train, diff,
report, init, import, layers, export, push, explain) are run here as subprocesses; run,
demo and the benchmarks both ways."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import crosscoders
from crosscoders import Crosscoder, CrosscoderConfig, TrainConfig, train
from crosscoders.cli import build_parser, main
from crosscoders.cli.help import FIELD_HELP
from crosscoders.harvest import DataSpec, HarvestConfig, ModelSpec, harvest
from crosscoders.testing import make_model, make_tokenizer, write_text_corpus
from test_explain import llm, make_diff_dir  # noqa: F401 (llm: the fake endpoint fixture)

SRC = Path(__file__).resolve().parents[1] / "src"

#: every subcommand's arguments as the parser had them before cli/ became a package
#: (name, nargs, type, choices, required): a flag may not disappear, be renamed or change
RECORDED = {
    'run': {
        '--no-progress switch',
        '--out 1',
        'config 1 required',
    },
    'demo': {
        '--no-progress switch',
        '--out 1',
    },
    'init': {
        '--example 1 {demo,gemma2,layers,smollm2}',
        '--force switch',
        '--out 1',
    },
    'train': {
        '--activation 1 {batchtopk,jumprelu,relu,topk}',
        '--batch-size 1 int',
        '--checkpoint-every 1 int',
        '--config 1',
        '--data 1 required',
        '--device 1',
        '--dict-size 1 int',
        '--expansion 1 int',
        '--k 1 int',
        '--l1-coeff 1 float',
        '--loggers + {jsonl,tensorboard,wandb}',
        '--lr 1 float',
        '--no-progress switch',
        '--out 1 required',
        '--parallel 1 {data,none}',
        '--seed 1 int',
        '--source-names +',
        '--steps 1 int',
        '--tensorboard-dir/--tensorboard 1',
        '--wandb-entity 1',
        '--wandb-project 1',
        '--wandb-run-name 1',
    },
    'bench synthetic': {
        '--activations +',
        '--dict-size 1 int',
        '--json 1',
        '--k 1 int',
        '--l1-coeff 1 float',
        '--preset 1 {anthropic,kissane,minder}',
        '--seed 1 int',
        '--steps 1 int',
        '--threads 1 int',
    },
    'bench diffing': {
        '--activations + {batchtopk,relu,topk}',
        '--config 1',
        '--json 1',
        '--preset 1 {anthropic,kissane,minder}',
        '--progress switch',
        '--seed 1 int',
        '--shared-latents 1 int',
        '--shifted 1 int',
        '--steps 1 int',
    },
    'bench layers': {
        '--d-model 1 int',
        '--fire-prob 1 float',
        '--json 1',
        '--layers 1 int',
        '--noise 1 float',
        '--seed 1 int',
        '--steps 1 int',
    },
    'bench': set(),
    'harvest': {
        '--base 1',
        '--batch-size 1 int',
        '--bos 1 {auto,context,document,none}',
        '--chat 1',
        '--chat-template-from 1 int',
        '--config 1',
        '--context-length 1 int',
        '--data +',
        '--device 1',
        '--dtype 1 {bfloat16,float16,float32}',
        '--eval-tokens 1 _number',
        '--exclude-tokens *',
        '--format 1 {auto,chat,text}',
        '--keep-special switch',
        '--layers/--sites +',
        '--messages-field 1',
        '--model append',
        '--no-progress switch',
        '--out 1 required',
        '--packing 1 {doc,pack}',
        '--revision 1',
        '--sequential switch',
        '--shard-tokens 1 int',
        '--skip-first 1 int',
        '--split 1',
        '--store-dtype 1 {bfloat16,float16,float32}',
        '--text-field 1',
        '--tokens 1 int',
        '--weights + float',
    },
    'diff': {
        '--base 1',
        '--batch-size 1 int',
        '--chat 1',
        '--config 1',
        '--device 1',
        '--examples 1 {all,exclusive,none}',
        '--latent-scaling 1 {all,auto,none}',
        '--max-tokens 1 int',
        '--models +',
        '--n-top 1 int',
        '--no-progress switch',
        '--nu-eps-max 1 float',
        '--nu-r-max 1 float',
        '--out 1 required',
        '--preset 1 {anthropic,kissane,minder}',
        '--steer-prompt append',
        '--store 1',
        '--weights-only switch',
        'run_dir 1 required',
    },
    'report': {
        '--max-examples 1 int',
        '--out 1',
        '--run 1',
        '--title 1',
        '--tokenizer 1',
        'diff_dir 1 required',
    },
    'layers': {
        '--data 1',
        '--max-tokens 1 int',
        '--min-freq 1 float',
        '--no-plot switch',
        '--out 1 required',
        '--threshold 1 float',
        'run_dir 1 required',
    },
    'explain': {
        '--api-base 1',
        '--api-key 1',
        '--backoff 1 float',
        '--cache 1',
        '--concurrency 1 int',
        '--crosscoder 1',
        '--device 1',
        '--fuzzing switch',
        '--latents 1 required',
        '--local 1',
        '--max-latents 1 int',
        '--max-tokens 1 int',
        '--model 1',
        '--n-explain 1 int',
        '--n-score 1 int',
        '--no-progress switch',
        '--prompts 1',
        '--retries 1 int',
        '--rpm 1 float',
        '--seed 1 int',
        '--store 1',
        '--temperature 1 float',
        '--timeout 1 float',
        '--tokenizer 1',
        'diff_dir 1 required',
    },
    'import': {
        '--format 1 {auto,crosscode,dictionary_learning,kissane}',
        '--out 1 required',
        '--scale + float',
        '--scale-from 1',
        '--source-names +',
        'source 1 required',
    },
    'push': {
        '--diff 1',
        '--message 1',
        '--private switch',
        '--report 1',
        '--token 1',
        'repo_id 1 required',
        'run_dir 1 required',
    },
    'export': {
        '--format 1 {crosscode,dictionary_learning} required',
        '--out 1 required',
        'run_dir 1 required',
    },
}


def _signature(action: argparse.Action) -> str:
    """e.g. ``--steps 1 int``, ``--data + required``, ``--no-progress switch``."""
    if action.nargs == 0:
        kind = "switch"
    elif isinstance(action, argparse._AppendAction):
        kind = "append"
    else:
        kind = "1" if action.nargs is None else str(action.nargs)
    parts = ["/".join(action.option_strings) or action.dest, kind]
    if kind != "switch" and action.type not in (None, str, Path):
        parts.append(action.type.__name__)
    if action.choices:
        parts.append("{" + ",".join(sorted(action.choices)) + "}")
    if action.required:
        parts.append("required")
    return " ".join(parts)


def _arguments(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
               ) -> dict[str, set[str]]:
    """{subcommand path: signatures of its arguments} for every subcommand below parser."""
    out, own = {}, set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out.update(_arguments(sub, (*path, name)))
        elif not isinstance(action, argparse._HelpAction):
            own.add(_signature(action))
    if path:
        out[" ".join(path)] = own
    return out


def test_every_flag_of_every_subcommand_is_kept():
    assert _arguments(build_parser()) == RECORDED


def test_every_field_flag_has_help_from_one_place():
    from crosscoders.cli import COMMANDS
    from crosscoders.cli.flags import Field, _owner

    used = set()
    for name in COMMANDS:
        module = sys.modules[f"crosscoders.cli.{name}"]
        for value in vars(module).values():
            for flag in value if isinstance(value, tuple) else ():
                if isinstance(flag, Field):
                    owner, leaf = _owner(flag.config, flag.path)
                    used.add((owner.__name__, leaf))
    listed = {(cls, field) for cls, fields in FIELD_HELP.items() for field in fields}
    assert used == listed  # no field flag without help, no help for a flag that is gone


@pytest.mark.parametrize("argv,says", [
    (["train", "--data", "x.pt", "--out", "r", "--steps", "many"],
     "argument --steps: invalid int value: 'many'"),
    (["diff", "run", "--out", "d", "--preset", "nope"], "argument --preset: invalid choice"),
    (["harvest", "--base", "b"], "the following arguments are required: --out"),
    (["export", "run", "--out", "e"], "the following arguments are required: --format"),
    (["layers", "run", "--out", "l", "--bogus", "1"], "unrecognized arguments: --bogus 1"),
    (["bench"], "the following arguments are required: bench"),
    (["trian"], "argument command: invalid choice: 'trian'"),
])
def test_a_bad_flag_is_one_line_and_exit_code_2(argv, says, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert len(lines) == 1 and out == "" and "Traceback" not in err, err
    assert lines[0].startswith("error: ") and says in lines[0], err
    assert lines[0].endswith("--help`")  # where the fix is
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_help_exits_0(capsys):
    assert main(["train", "--help"]) == 0
    text = capsys.readouterr().out
    assert "--dict-size" in text and "(default: 5,000)" in text  # TrainConfig.steps


def test_train_takes_its_crosscoder_defaults_from_the_pipeline(tmp_path, monkeypatch):
    """One function builds the crosscoder config of `run` and of `train`: change its
    default and both follow; --expansion / --dict-size / a config file, same precedence."""
    from crosscoders.pipeline import PipelineConfig
    from crosscoders.pipeline import config as pipeline_config

    torch.save(torch.randn(512, 2, 8, generator=torch.Generator().manual_seed(0)),
               tmp_path / "acts.pt")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("crosscoder:\n  dict_size: 40\n  k: 4\ntrain:\n  eval_tokens: 0\n")
    monkeypatch.setattr(pipeline_config, "DEFAULT_EXPANSION", 3)
    pipeline = PipelineConfig.from_dict({"harvest": {"models": [{"path": "a"}, {"path": "b"}],
                                                     "data": [{"path": "t.txt"}]},
                                         "crosscoder": {"k": 4}})
    assert pipeline.crosscoder_config(n_sources=2, d_model=8).dict_size == 3 * 8

    argv = ["train", "--data", str(tmp_path / "acts.pt"), "--steps", "1", "--batch-size",
            "128", "--no-progress"]
    assert main([*argv, "--out", str(tmp_path / "run"), "--k", "4"]) == 0
    assert Crosscoder.load(tmp_path / "run").dict_size == 3 * 8  # the pipeline's default

    def config_of(*flags: str) -> CrosscoderConfig:
        """The crosscoder config `train` is given (the training itself is not needed)."""
        seen = []
        monkeypatch.setattr(crosscoders, "train",
                            lambda cc, *a, **k: seen.append(cc) or SimpleNamespace(dict_size=0))
        assert main([*argv, "--out", str(tmp_path / "r"), *flags]) == 0
        return seen[0]

    assert config_of("--config", str(cfg)).dict_size == 40
    assert config_of("--config", str(cfg), "--expansion", "2").dict_size == 16  # flag wins
    config = config_of("--config", str(cfg), "--expansion", "2", "--dict-size", "24", "--k", "6")
    assert (config.dict_size, config.k) == (24, 6)  # --dict-size beats --expansion


# ------------------------------------------------------------------ in-process, new here


def _tiny_pipeline(root: Path, out: Path) -> Path:
    """A pipeline config over two tiny local models: harvest, train, diff, report."""
    config = root / "pipeline.yaml"
    config.write_text(json.dumps({
        "out": str(out),
        "harvest": {"models": [{"path": str(root / "base"), "name": "base", "sites": ["1"]},
                               {"path": str(root / "chat"), "name": "chat", "sites": ["1"]}],
                    "data": [{"path": str(root / "text.jsonl")}], "tokens": 400,
                    "context_length": 16, "batch_size": 8, "shard_tokens": 200,
                    "store_dtype": "float32", "device": "cpu", "eval_tokens": 0.1},
        "crosscoder": {"activation": "batchtopk", "k": 4, "expansion": 2},
        "train": {"steps": 10, "batch_size": 64, "eval_tokens": 0},
        "diff": {"causal_contexts": 1, "similarity_tokens": 200},
    }))
    return config


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """Two tiny models and a text file; a store harvested from them, a crosscoder trained
    on it, its diff, and the crosscoder exported: the inputs of every command."""
    root = tmp_path_factory.mktemp("entry")
    tok = make_tokenizer()
    for seed, name in enumerate(("base", "chat")):
        make_model(root / name, "llama", seed=seed, tokenizer=tok, d_model=16, n_layers=2)
    write_text_corpus(root / "text.jsonl", 40, seed=0)
    harvest(HarvestConfig(models=[ModelSpec(str(root / "base"), sites=["1"], name="base"),
                                  ModelSpec(str(root / "chat"), sites=["1"], name="chat")],
                          data=[DataSpec(str(root / "text.jsonl"))], tokens=400,
                          context_length=16, batch_size=8, shard_tokens=200,
                          store_dtype="float32", device="cpu", eval_tokens=0.1),
            root / "store", progress=False)
    train(CrosscoderConfig(n_sources=2, d_model=16, dict_size=32, k=4), root / "store",
          TrainConfig(steps=10, batch_size=64, eval_tokens=0, progress=False),
          run_dir=root / "run")
    assert main(["diff", str(root / "run"), "--out", str(root / "diff"), "--no-progress"]) == 0
    assert main(["export", str(root / "run"), "--format", "dictionary_learning", "--out",
                 str(root / "exported")]) == 0
    return root


def test_run_in_process(world, tmp_path, capsys):
    config = _tiny_pipeline(world, tmp_path / "ignored")
    assert main(["run", str(config), "--out", str(tmp_path / "exp"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"experiment: {tmp_path / 'exp'}" in out and "latents:" in out
    assert (tmp_path / "exp" / "report" / "report.html").read_text().startswith("<!")
    summary = json.loads((tmp_path / "exp" / "diff" / "summary.json").read_text())
    assert sum(summary["counts"].values()) == 2 * 16  # expansion 2 x d_model 16
    assert not (tmp_path / "ignored").exists()  # --out replaced the config's out


def test_demo_in_process_at_a_reduced_size(tmp_path, monkeypatch, capsys):
    """`crosscoders demo` as it is, on a tiny organism and a short run: the command's
    plumbing, not the organism's result (test_demo checks that)."""
    from crosscoders.organism import tiny_config
    from crosscoders.pipeline import examples

    full = examples.load_example

    def small(name):
        config = full(name)
        return config.replace(
            organism=tiny_config(pretrain_steps=5, finetune_steps=5, pretrain_docs=60,
                                 chat_conversations=60, eval_docs=10, eval_conversations=10,
                                 eval_prompts=4, max_new_tokens=4),
            harvest=config.harvest.replace(tokens=1500, context_length=48),
            train=config.train.replace(steps=10, batch_size=128, eval_tokens=0),
            diff=config.diff.replace(causal_contexts=1, similarity_tokens=500))

    monkeypatch.setattr(examples, "load_example", small)
    monkeypatch.setenv("CROSSCODERS_CACHE", str(tmp_path / "cache"))
    assert main(["demo", "--out", str(tmp_path / "demo"), "--no-progress"]) == 0
    assert "most chat-specific latents" in capsys.readouterr().out
    assert (tmp_path / "demo" / "report" / "report.html").exists()
    assert (tmp_path / "demo" / "pipeline.yaml").exists()


def test_bench_commands_in_process(tmp_path, capsys):
    planted = tmp_path / "planted.yaml"
    planted.write_text(
        "planted: {d_model: 16, n_shared: 6, n_shared_rotated: 0, n_shared_weaker: 4,\n"
        "          n_base_only: 3, n_chat_only: 3, n_tokens: 4096, fire_prob: 0.05}\n"
        "n_decoupled: 4\ndict_size: 48\nbatch_size: 256\n")
    runs = {
        "synthetic": ["--steps", "2", "--activations", "relu", "--dict-size", "16",
                      "--threads", "1", "--seed", "3"],
        "diffing": ["--config", str(planted), "--steps", "2", "--activations", "relu",
                    "--seed", "3", "--shifted", "2"],
        "layers": ["--layers", "2", "--d-model", "4", "--steps", "1"],
    }
    for name, flags in runs.items():
        out = tmp_path / f"{name}.json"
        assert main(["bench", name, *flags, "--json", str(out)]) == 0, name
        assert json.loads(out.read_text()), name
    text = capsys.readouterr().out
    assert "seed 3" in text  # bench synthetic: --seed is the planted data's
    diffing = json.loads((tmp_path / "diffing.json").read_text())
    assert diffing["config"]["seed"] == diffing["config"]["planted"]["seed"] == 3
    assert diffing["config"]["planted"]["n_shared_shifted"] == 2
    assert json.loads((tmp_path / "layers.json").read_text())["n_layers"] == 2


# ------------------------------------------------------------------ as subprocesses


def _python_m(argv: list[str], cwd: Path, env: dict[str, str | None] | None = None
              ) -> subprocess.CompletedProcess:
    """``python -m crosscoders *argv`` on this checkout's sources; ``env`` None: unset."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {}), "PYTHONPATH": os.pathsep.join(
        [str(SRC), *filter(None, [os.environ.get("PYTHONPATH")])])}  # 1 thread: run side by side
    env = {k: v for k, v in env.items() if v is not None and k != "CROSSCODERS_TRACEBACK"}
    return subprocess.run([sys.executable, "-m", "crosscoders", *argv], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def _one_error(proc: subprocess.CompletedProcess) -> str:
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and "Traceback" not in proc.stderr
    return lines[0]


def test_every_subcommand_as_python_m(world, tmp_path, llm):  # noqa: F811 (the fixture)
    """``python -m crosscoders CMD`` for every command, all at once (they are independent):
    a small successful run where one is cheap, else a bad input (exit 2, one line)."""
    w, t = world, tmp_path
    explained = make_diff_dir(t / "explain")
    no_token = {"HF_TOKEN": None, "HUGGING_FACE_HUB_TOKEN": None,
                "HF_TOKEN_PATH": str(t / "no-token")}  # the real Hub client, no network
    commands = {
        "harvest": ["harvest", "--base", str(w / "base"), "--chat", str(w / "chat"),
                    "--layers", "1", "--data", str(w / "text.jsonl"), "--tokens", "200",
                    "--context-length", "16", "--device", "cpu", "--out", str(t / "store"),
                    "--no-progress"],
        "train": ["train", "--data", str(w / "store"), "--out", str(t / "run"), "--steps",
                  "3", "--dict-size", "32", "--k", "4", "--batch-size", "64", "--no-progress"],
        "diff": ["diff", str(w / "run"), "--out", str(t / "diff"), "--weights-only"],
        "report": ["report", str(w / "diff"), "--out", str(t / "report.html"), "--title",
                   "sub"],
        "run": ["run", str(_tiny_pipeline(w, t / "exp")), "--no-progress"],
        "init": ["init", "--example", "demo", "--out", str(t / "demo.yaml")],
        "demo": ["demo", "--out", str(w / "text.jsonl")],  # a file: refused before any work
        "bench synthetic": ["bench", "synthetic", "--json", str(w / "text.jsonl" / "r.json")],
        "bench diffing": ["bench", "diffing", "--config", str(t / "missing.yaml")],
        "bench layers": ["bench", "layers", "--d-model", "0"],
        "import": ["import", str(w / "exported"), "--out", str(t / "imported")],
        "layers": ["layers", str(w / "run"), "--out", str(t / "layers"), "--no-plot"],
        "export": ["export", str(w / "run"), "--format", "dictionary_learning", "--out",
                   str(t / "exported")],
        "push": ["push", str(w / "run"), "me/cc"],
        "explain": ["explain", str(explained), "--latents", "0,1", "--api-base", llm.url,
                    "--model", "fake", "--no-progress"],
    }
    env = {"push": no_token}
    with ThreadPoolExecutor(max_workers=max(2, min(8, os.cpu_count() or 2))) as pool:
        futures = {name: pool.submit(_python_m, argv, t, env.get(name))
                   for name, argv in commands.items()}
        procs = {name: future.result() for name, future in futures.items()}
    for name, proc in procs.items():
        if name in ("demo", "bench synthetic", "bench diffing", "bench layers", "push"):
            continue
        assert proc.returncode == 0 and proc.stderr.count("Traceback") == 0, (name, proc.stderr)
    assert "200 tokens x 2 sources" in procs["harvest"].stdout
    assert Crosscoder.load(t / "run").config.dict_size == 32
    assert (t / "diff" / "latents.csv").exists()
    assert "sub" in (t / "report.html").read_text()
    assert (t / "exp" / "report" / "report.html").exists()
    assert "organism" in (t / "demo.yaml").read_text()
    assert Crosscoder.load(t / "imported").dict_size == 32
    assert json.loads((t / "layers" / "summary.json").read_text())["n_latents"] == 32
    assert sorted(p.name for p in (t / "exported").iterdir()) == sorted(
        p.name for p in (w / "exported").iterdir())  # as the in-process export wrote it
    assert len(json.loads((explained / "explanations.json").read_text())) == 2
    assert "is a file, not a directory" in _one_error(procs["demo"])
    assert "choose another path" in _one_error(procs["bench synthetic"])
    assert "does not exist" in _one_error(procs["bench diffing"])
    assert "--d-model must be >= 1" in _one_error(procs["bench layers"])
    assert "hf auth login" in _one_error(procs["push"])
    assert (w / "text.jsonl").is_file()  # the file in the way is untouched
