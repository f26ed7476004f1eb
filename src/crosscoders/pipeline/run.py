"""``crosscoders run CONFIG.yaml``: every stage of an experiment, each redone only if needed."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crosscoders.errors import ConfigError
from crosscoders.pipeline.config import PipelineConfig
from crosscoders.pipeline.stages import StageOutcome, run_stage

ORGANISM_PLACEHOLDERS = ("organism:base", "organism:chat", "organism:pretrain",
                         "organism:chat_data")


@dataclass
class PipelineResult:
    out: Path
    stages: dict[str, StageOutcome] = field(default_factory=dict)

    @property
    def store_dir(self) -> Path:
        return self.out / "store"

    @property
    def run_dir(self) -> Path:
        return self.out / "crosscoder"

    @property
    def diff_dir(self) -> Path:
        return self.out / "diff"

    @property
    def report_path(self) -> Path | None:
        outcome = self.stages.get("report")
        return outcome.result if outcome else None


def run_pipeline(config: PipelineConfig, progress: bool = True, log=print) -> PipelineResult:
    """Run organism (optional) -> harvest -> train -> diff -> report into ``config.out``."""
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    config.save(out / "pipeline.yaml")
    result = PipelineResult(out)
    harvest_cfg = config.harvest
    upstream: list[str] = []

    if config.organism is not None:
        organism = run_stage("organism", out / "organism", config.organism, [],
                             lambda d: _build_organism(config.organism, d, progress),
                             log, load=_load_organism)
        result.stages["organism"] = organism
        harvest_cfg = _resolve_organism_paths(harvest_cfg, organism.result)
        upstream = [organism.hash]
    elif _uses_organism(harvest_cfg):
        raise ConfigError("harvest refers to organism:... paths but the config has no "
                          "'organism' section; add 'organism: {}'")

    from crosscoders.harvest import harvest
    from crosscoders.store import ActivationStore

    stage = run_stage("harvest", result.store_dir, harvest_cfg.to_dict(), upstream,
                      lambda d: harvest(harvest_cfg, d, progress=progress), log)
    result.stages["harvest"] = stage
    store = ActivationStore.open(result.store_dir)

    names = [s.get("name") for s in store.sources] or None
    cc_config = config.crosscoder_config(store.n_sources, store.d_model, names)
    train_cfg = config.train.replace(progress=progress and config.train.progress)
    stage = run_stage(
        "train", result.run_dir,
        {"crosscoder": cc_config.to_dict(), "train": config.train.to_dict()}, [stage.hash],
        lambda d: _train(cc_config, store, train_cfg, d), log,
    )
    result.stages["train"] = stage

    stage = run_stage("diff", result.diff_dir, config.diff, [stage.hash],
                      lambda d: _diff(result.run_dir, store, d, config.diff, progress), log)
    result.stages["diff"] = stage

    report_dir = out / "report"
    stage = run_stage("report", report_dir, config.report, [stage.hash],
                      lambda d: _report(result, d, config.report), log,
                      load=lambda d: d / "report.html")
    result.stages["report"] = stage
    return result


def _uses_organism(harvest_cfg) -> bool:
    paths = [m.path for m in harvest_cfg.models] + [d.path for d in harvest_cfg.data]
    return any(p in ORGANISM_PLACEHOLDERS for p in paths)


def _build_organism(section: dict[str, Any], directory: Path, progress: bool):
    from crosscoders.organism import OrganismConfig, build_organism

    return build_organism(OrganismConfig.from_dict(section), cache_dir=directory,
                          progress=progress)


def _load_organism(directory: Path):
    from crosscoders.organism import load_organism

    return load_organism(directory)


def _resolve_organism_paths(harvest_cfg, organism):
    paths = {
        "organism:base": str(organism.base_dir),
        "organism:chat": str(organism.chat_dir),
        "organism:pretrain": str(organism.data_dir / "pretrain.txt"),
        "organism:chat_data": str(organism.data_dir / "chat.jsonl"),
    }
    data = harvest_cfg.to_dict()
    for model in data["models"]:
        model["path"] = paths.get(model["path"], model["path"])
    for item in data["data"]:
        item["path"] = paths.get(item["path"], item["path"])
    return type(harvest_cfg).from_dict(data)


def _train(cc_config, store, train_cfg, directory: Path):
    from crosscoders import train

    return train(cc_config, store, train_cfg, run_dir=directory)


def _diff(run_dir: Path, store, directory: Path, section: dict[str, Any], progress: bool):
    from crosscoders.diff.run import run_diff

    return run_diff(run_dir, store, directory, progress=progress, **section)


def _report(result: PipelineResult, directory: Path, section: dict[str, Any]) -> Path:
    from crosscoders.report import build_report

    return build_report(result.diff_dir, run_dir=result.run_dir,
                        out=directory / "report.html", **section)


def read_summary(result: PipelineResult) -> dict[str, Any]:
    path = result.diff_dir / "summary.json"
    return json.loads(path.read_text()) if path.exists() else {}
