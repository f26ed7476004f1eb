"""``crosscoders run CONFIG.yaml``: every stage of an experiment, each redone only if needed."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from crosscoders.diff.schema import Files
from crosscoders.errors import ConfigError, CrosscodersError
from crosscoders.io import read_json
from crosscoders.pipeline.config import PipelineConfig
from crosscoders.pipeline.distributed import Coordinator, coordinator_for
from crosscoders.pipeline.stages import (
    STAGE_DIR,
    StageOutcome,
    config_hash,
    is_stage_entry,
    read_record,
    run_stage,
)
from crosscoders.store import format as store_format
from crosscoders.train.tracking import check_loggers

if TYPE_CHECKING:
    from crosscoders.harvest.config import HarvestConfig
    from crosscoders.model import Crosscoder, CrosscoderConfig
    from crosscoders.organism.build import Organism
    from crosscoders.pipeline.config import LayersSection
    from crosscoders.store import ActivationStore
    from crosscoders.train.config import TrainConfig

ORGANISM_PLACEHOLDERS = ("organism:base", "organism:chat", "organism:pretrain",
                         "organism:chat_data")


@dataclass
class PipelineResult:
    out: Path
    stages: dict[str, StageOutcome] = field(default_factory=dict)
    organism: Organism | None = None

    @property
    def store_dir(self) -> Path:
        """``out/store``, or the store ``harvest.store`` names."""
        outcome = self.stages.get("harvest")
        return outcome.directory if outcome else self.out / "store"

    @property
    def run_dir(self) -> Path:
        return self.out / "crosscoder"

    @property
    def diff_dir(self) -> Path:
        return self.out / "diff"

    @property
    def layers_dir(self) -> Path:
        return self.out / "layers"

    harvest: HarvestConfig | None = None  # the harvest config with organism paths resolved

    def token_strings(self):
        """id list -> token strings, from the first model's tokenizer (None if unavailable)."""
        from crosscoders.harvest import load_tokenizer

        if self.harvest is None:
            return None
        return load_tokenizer(self.harvest.models[0]).convert_ids_to_tokens

    @property
    def report_path(self) -> Path | None:
        """The diff report, or the layers report of a one-model experiment."""
        from crosscoders.layers.study import LayerFiles

        outcome = self.stages.get("report")
        if outcome is not None:
            return outcome.result
        layers_report = self.layers_dir / LayerFiles.REPORT
        return layers_report if "layers" in self.stages and layers_report.exists() else None


def run_pipeline(config: PipelineConfig, progress: bool = True, log=print) -> PipelineResult:
    """Run organism (optional) -> harvest -> train -> diff -> report into ``config.out``.

    Under torchrun (``train.parallel`` auto or data) rank 0 runs every stage and all ranks
    train together; the other ranks return an empty result once training is done.
    """
    coordinator = coordinator_for(config.train)
    try:
        if coordinator is not None and not coordinator.is_main:
            coordinator.follow()
            return PipelineResult(Path(config.out).expanduser())
        return _run_stages(config, progress, log, coordinator)
    finally:
        if coordinator is not None:
            coordinator.close()


def _run_stages(config: PipelineConfig, progress: bool, log, coordinator: Coordinator | None
                ) -> PipelineResult:
    out = Path(config.out).expanduser()
    check_loggers(config.train, out / "crosscoder")  # a missing wandb fails before harvesting
    claim_out(out)
    if config.harvest.store is None:
        _refuse_foreign_store(out, out / "store")
    comparison = None
    if config.layers.compare is not None:  # a bad file is refused before any work
        from crosscoders.layers.study import read_comparison

        comparison = read_comparison(config.layers.compare)
    config.save(out / "pipeline.yaml")
    result = PipelineResult(out)
    harvest_cfg = config.harvest
    upstream: list[str] = []

    if config.organism is not None:
        from crosscoders.organism import build_organism

        log("organism: building or reusing the cached model organism")
        organism = build_organism(config.organism, progress=progress)
        result.organism = organism
        harvest_cfg = _resolve_organism_paths(harvest_cfg, organism)
        upstream = [config.organism.cache_key()]
    elif _uses_organism(harvest_cfg):
        raise ConfigError("harvest refers to organism:... paths but the config has no "
                          "'organism' section; add 'organism: {}'")

    from crosscoders.diff.run import run_diff
    from crosscoders.harvest import harvest
    from crosscoders.store import ActivationStore

    if harvest_cfg.store is not None:
        from crosscoders.pipeline.reuse import open_reused_store

        store, harvest_cfg = open_reused_store(harvest_cfg.store, harvest_cfg.models)
        digest = config_hash({"store": str(store.root.resolve()),
                              "manifest_sha256": store.manifest_sha256}, [])
        log(f"harvest: reusing the store {store.root} (harvest.store)")
        stage = StageOutcome("harvest", store.root, digest, "reused", store)
    else:
        harvest_cfg = harvest_cfg.harvest_config()
        stage = run_stage("harvest", out / "store", harvest_cfg.to_dict(), upstream,
                          lambda d: harvest(harvest_cfg, d, progress=progress), log)
        store = ActivationStore.open(stage.directory)
    result.harvest = harvest_cfg
    result.stages["harvest"] = stage

    names = [s.get("name") for s in store.sources] or None
    cc_config = config.crosscoder_config(store.n_sources, store.d_model, names)
    train_cfg = config.train.replace(progress=progress and config.train.progress)

    def train_work(directory: Path):
        if coordinator is not None:  # the other ranks join in
            coordinator.announce_train(store.root, cc_config.to_dict(), train_cfg.to_dict(),
                                       directory)
        return _train(cc_config, store, train_cfg, directory)

    stage = run_stage(
        "train", result.run_dir,
        {"crosscoder": cc_config.to_dict(), "train": train_identity(config.train)},
        [stage.hash], train_work, log,
    )
    if coordinator is not None and stage.status == "skipped":
        coordinator.announce_skip()
    result.stages["train"] = stage

    if len(harvest_cfg.models) == 1:  # one model, several layers: layer profiles
        section = config.layers
        identity = section.to_dict()
        if comparison is not None:  # the file's content, not only its path, decides a redo
            identity["compare"] = config_hash(comparison, [])
        stage = run_stage("layers", result.layers_dir, identity, [stage.hash],
                          lambda d: _layers(result, store, section, comparison,
                                            config.train.device, progress, log, d), log)
        result.stages["layers"] = stage
        return result

    models = dict(zip(harvest_cfg.model_names(), (m.path for m in harvest_cfg.models)))
    diff_cfg = config.diff.replace(progress=progress and config.diff.progress)
    stage = run_stage("diff", result.diff_dir, config.diff.to_dict(), [stage.hash],
                      lambda d: run_diff(result.run_dir, store, d, diff_cfg, models), log)
    result.stages["diff"] = stage

    report_dir = out / "report"
    stage = run_stage("report", report_dir, config.report.to_dict(), [stage.hash],
                      lambda d: _report(result, d, config.report, harvest_cfg), log,
                      load=lambda d: d / Files.REPORT)
    result.stages["report"] = stage
    return result


def train_identity(train_config) -> dict[str, Any]:
    """The train settings that decide the train stage's hash.

    How the work is spread over processes does not change the crosscoder (up to rounding),
    so ``parallel`` and ``dist_timeout_minutes`` are left out, and ``batchtopk_scope`` when
    at its default: a config gains the keys without its finished stage being redone. Where
    the metrics are logged (``loggers``, wandb, TensorBoard) changes nothing either.
    """
    identity = train_config.to_dict()
    for key in ("parallel", "dist_timeout_minutes", *train_config.TRACKING_FIELDS):
        identity.pop(key, None)
    if identity.get("batchtopk_scope") == "global":
        identity.pop("batchtopk_scope")
    return identity


def claim_out(out: Path) -> None:
    """Make ``out`` the experiment directory: new, empty, or made by an earlier run.

    Anything else (a file, a store made by ``crosscoders harvest``, a folder of other
    files) is refused before anything is written into it.
    """
    if out.exists() and not out.is_dir():
        raise CrosscodersError(f"out: {out} is a file; set out: (or --out) to a new or "
                               "empty directory")
    stages = out / STAGE_DIR
    if stages.is_dir():
        foreign = sorted(p for p in stages.iterdir() if not is_stage_entry(p))
        if foreign:
            raise CrosscodersError(
                f"{foreign[0]} is not a stage record written by `crosscoders run`; move it out "
                f"of {stages}, or choose another out: directory"
            )
    elif out.is_dir():
        entries = sorted(p.name for p in out.iterdir())
        if entries:
            for store in (out, out / "store"):
                _refuse_foreign_store(out, store, also="and choose a new or empty directory "
                                      "for out: (or --out)")
            shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
            raise CrosscodersError(
                f"out: {out} is not empty ({shown}) and was not made by `crosscoders run`; "
                "choose a new or empty directory for out: (or --out)"
            )
    try:
        stages.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CrosscodersError(f"out: cannot create {out / STAGE_DIR} ({err.strerror}); "
                               "choose another directory for out: (or --out)") from None


def is_experiment_dir(out: Path) -> bool:
    """Whether ``out`` was made by ``crosscoders run`` (its ``stages/`` holds only records)."""
    stages = out / STAGE_DIR
    return stages.is_dir() and all(is_stage_entry(p) for p in stages.iterdir())


def _refuse_foreign_store(out: Path, store: Path, also: str = "or choose another out:") -> None:
    """A store at ``store`` that no stage record vouches for was made by `crosscoders harvest`."""
    if not ((store / store_format.MANIFEST).exists() or (store / store_format.PROGRESS).exists()):
        return
    if store != out and is_experiment_dir(out) and read_record(out, "harvest") is not None:
        return
    raise CrosscodersError(
        f"{store} holds an activation store that `crosscoders run` did not make; to use it, "
        f"set `harvest: {{store: {store}}}` in the config {also}"
    )


def _uses_organism(harvest_cfg) -> bool:
    paths = [m.path for m in harvest_cfg.models] + [d.path for d in harvest_cfg.data]
    return any(p in ORGANISM_PLACEHOLDERS for p in paths)


def _resolve_organism_paths(harvest_cfg: HarvestConfig, organism: Organism) -> HarvestConfig:
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


def _train(cc_config: CrosscoderConfig, store: ActivationStore, train_cfg: TrainConfig,
           directory: Path) -> Crosscoder:
    from crosscoders import train

    return train(cc_config, store, train_cfg, run_dir=directory)


def _layers(result: PipelineResult, store: ActivationStore, section: LayersSection,
            comparison: dict | None, device: str, progress: bool, log,
            directory: Path) -> Path:
    from crosscoders.harvest import load_tokenizer
    from crosscoders.harvest.models import resolve_device
    from crosscoders.layers.study import run_layer_study
    from crosscoders.model import Crosscoder

    model = Crosscoder.load(result.run_dir, device=resolve_device(device))
    try:  # the text of the contexts; the profiles and FVU need only the store
        tokenizer = load_tokenizer(result.harvest.models[0])
    except CrosscodersError as err:
        log(f"layers: contexts keep token ids only ({err})")
        tokenizer = None
    run_layer_study(model, store, directory, threshold=section.threshold,
                    min_freq=section.min_freq, max_tokens=section.max_tokens,
                    example_latents=section.example_latents, n_examples=section.n_examples,
                    tokenizer=tokenizer, comparison=comparison,
                    run_dir=result.run_dir, title=f"Layer study · {result.out.resolve().name}",
                    progress=progress)
    return directory


def _report(result: PipelineResult, directory: Path, section, harvest_cfg) -> Path:
    from crosscoders.harvest import load_tokenizer
    from crosscoders.report import build_report

    tokenizer = load_tokenizer(harvest_cfg.models[0])
    return build_report(result.diff_dir, run_dir=result.run_dir,
                        out=directory / Files.REPORT, title=section.title,
                        max_examples=section.max_examples,
                        token_strings=tokenizer.convert_ids_to_tokens)


def read_summary(result: PipelineResult) -> dict[str, Any]:
    path = result.diff_dir / Files.SUMMARY
    return read_json(path) if path.exists() else {}
