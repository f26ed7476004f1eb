"""Where a run's metrics go: ``metrics.jsonl``, Weights & Biases, TensorBoard.

The trainer hands every record (``{"step": ..., "split": "train"|"eval", ...}``) to a
:class:`Tracking`, which passes it to each logger ``TrainConfig.loggers`` names, once, on
rank 0. Before each checkpoint every logger puts what it holds on disk (or hands it to
wandb). A resumed run repeats the steps between its checkpoint and the kill, computing the
same values, and none is logged twice: the JSONL file is cut back to the checkpoint's step;
TensorBoard purges the events after it (``purge_step``), so the repeated steps replace the
killed run's; the wandb run keeps its id in ``tracking.json`` in the run directory, is
continued with ``resume="allow"`` and is sent the steps after the checkpoint, or, online,
after the last step the server holds. At the end, the relative decoder norms of a
two-source crosscoder (a histogram) and its category counts go to wandb's summary and to
TensorBoard.
"""

from __future__ import annotations

import importlib
import json
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from crosscoders.errors import ConfigError, CrosscodersError
from crosscoders.io import atomic_write_text, brief, check_dir_path, read_json, write_json

if TYPE_CHECKING:
    from crosscoders.model import Crosscoder
    from crosscoders.train.config import TrainConfig

METRICS_FILE = "metrics.jsonl"
#: what a run directory remembers for its loggers (the wandb run id)
TRACKING_FILE = "tracking.json"
#: loggers that need a library of their name, installed by the extra of their name
OPTIONAL = ("wandb", "tensorboard")
#: bins of the relative-norm histogram over [0, 1]
REL_NORM_BINS = 50


@dataclass
class TrainingSummary:
    """What a finished run reports besides its curves (two-source crosscoders only)."""

    step: int
    #: [F] n_1 / (n_0 + n_1) of the decoder norms in normalised units; None: not 2 sources
    rel_norm_F: np.ndarray | None = None
    #: latents per category (shared, base_only, chat_only, other), default preset
    categories: dict[str, int] = field(default_factory=dict)


class Logger(Protocol):
    """One destination for the metrics."""

    #: whether :meth:`log_summary` does anything (the summary is only computed if wanted)
    wants_summary: bool

    def log_config(self, config: dict[str, Any]) -> None: ...

    def log(self, record: dict[str, Any], step: int) -> None: ...

    def log_summary(self, summary: TrainingSummary) -> None: ...

    def flush(self) -> None: ...

    def close(self, ok: bool = True) -> None: ...


# ------------------------------------------------------------------------------ choice


def logger_names(config: TrainConfig) -> list[str]:
    """The loggers a config turns on: ``loggers`` plus those its wandb/TensorBoard
    settings imply, each once."""
    names = list(dict.fromkeys(config.loggers))
    if config.wandb_project and "wandb" not in names:
        names.append("wandb")
    if config.tensorboard_dir and "tensorboard" not in names:
        names.append("tensorboard")
    return names


def _require(name: str) -> Any:
    """Import a logger's library, or say in one line how to install it."""
    try:
        return importlib.import_module(name)
    except ImportError:
        raise CrosscodersError(
            f"the {name} logger needs the {name} package, which is not installed; "
            f"pip install 'crosscoders[{name}]' (or drop {name} from the train loggers)"
        ) from None


def check_loggers(config: TrainConfig, run_dir: str | Path | None) -> None:
    """Fail before any work when a chosen logger cannot run: its library is missing or
    TensorBoard has no directory to write to."""
    names = logger_names(config)
    for name in names:
        if name in OPTIONAL:
            _require(name)
    if "tensorboard" in names and config.tensorboard_dir is None and run_dir is None:
        raise ConfigError(
            "the tensorboard logger needs a directory: set tensorboard_dir "
            "(--tensorboard-dir) or train into a run directory"
        )
    if "tensorboard" in names:
        _require_summary_writer()
        if config.tensorboard_dir is not None:
            check_dir_path(config.tensorboard_dir, "tensorboard_dir (--tensorboard)")


def _require_summary_writer() -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:  # torch's wrapper refuses too old a tensorboard
        raise CrosscodersError(
            f"torch cannot write TensorBoard files ({brief(err)}); "
            "pip install 'crosscoders[tensorboard]'"
        ) from None
    return SummaryWriter


def open_tracking(config: TrainConfig, run_dir: Path | None, start_step: int,
                  resumed: bool) -> Tracking:
    """The loggers of a run that trains from ``start_step`` (a checkpoint's step when
    ``resumed``, else 0). Call on rank 0 only."""
    check_loggers(config, run_dir)
    loggers: list[Logger] = []
    try:
        for name in logger_names(config):
            if name == "jsonl" and run_dir is not None:
                loggers.append(JsonlLogger(run_dir / METRICS_FILE, start_step))
            elif name == "wandb":
                loggers.append(WandbLogger(config, run_dir, start_step))
            elif name == "tensorboard":
                log_dir = config.tensorboard_dir or run_dir / "tensorboard"
                loggers.append(TensorBoardLogger(Path(log_dir), start_step, resumed))
    except BaseException:
        Tracking(loggers).close(ok=False)
        raise
    return Tracking(loggers)


class Tracking:
    """Every logger of a run; a context manager that closes them (failed on an error)."""

    def __init__(self, loggers: list[Logger] | None = None):
        self.loggers = list(loggers or [])

    def log_config(self, config: dict[str, Any]) -> None:
        for logger in self.loggers:
            logger.log_config(config)

    def log(self, record: dict[str, Any]) -> None:
        for logger in self.loggers:
            logger.log(record, int(record["step"]))

    def log_summary(self, model: Crosscoder, step: int) -> None:
        wanting = [logger for logger in self.loggers if logger.wants_summary]
        if wanting:
            summary = training_summary(model, step)
            for logger in wanting:
                logger.log_summary(summary)

    def flush(self) -> None:
        """Put what was logged on disk: called before each checkpoint, so a killed run
        loses no step up to the checkpoint it resumes from."""
        for logger in self.loggers:
            logger.flush()

    def close(self, ok: bool = True) -> None:
        """Close every logger; after an error (``ok`` False) one that fails to close is
        passed over, so the error that stopped training is the one raised."""
        loggers, self.loggers = self.loggers, []
        failed = None
        for logger in loggers:
            try:
                logger.close(ok)
            except Exception as err:
                failed = failed or err
        if failed is not None and ok:
            raise failed

    def __enter__(self) -> Tracking:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        self.close(ok=kind is None)


def training_summary(model: Crosscoder, step: int) -> TrainingSummary:
    """Relative decoder norms and category counts of a two-source crosscoder."""
    if model.n_sources != 2:
        return TrainingSummary(step)
    from crosscoders.diff.categories import CATEGORIES, classify_latents, relative_norm

    # decoder norms in the normalised units the sparsity penalty saw (as decoder_norms())
    W_FSD = (model.W_dec.detach() * model.folded_scale_S.detach()[None, :, None]).cpu()
    labels_F = classify_latents(W_FSD)
    counts = {name: int((labels_F == name).sum()) for name in CATEGORIES}
    return TrainingSummary(step, relative_norm(W_FSD).double().numpy(), counts)


def _scalars(record: dict[str, Any]) -> dict[str, float]:
    """``{"train/loss": ..., "eval/fvu/base": ...}``: a record's numbers under its split."""
    split = record.get("split", "train")
    return {f"{split}/{key}": float(value) for key, value in record.items()
            if key not in ("step", "split") and isinstance(value, (int, float))
            and not isinstance(value, bool)}


# ------------------------------------------------------------------------------ JSONL


class JsonlLogger:
    """``metrics.jsonl``: one JSON record per line, as the trainer made it."""

    wants_summary = False

    def __init__(self, path: Path, start_step: int):
        self.path = path
        truncate_records(path, start_step)

    def log_config(self, config: dict[str, Any]) -> None:
        """The config is in ``run.json`` beside the file."""

    def log(self, record: dict[str, Any], step: int) -> None:
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")

    def log_summary(self, summary: TrainingSummary) -> None:
        """Nothing: the diff step computes the categories from the saved model."""

    def flush(self) -> None:
        """Each record is written when logged."""

    def close(self, ok: bool = True) -> None:
        """Nothing stays open."""


def truncate_records(path: Path, step: int) -> None:
    """Drop records logged after ``step`` (and lines cut short by a kill): the resumed run
    logs them again."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    atomic_write_text(path, "".join(line + "\n" for line in keep))


# ------------------------------------------------------------------------------ wandb


class WandbLogger:
    """A Weights & Biases run; one run directory is one wandb run, continued by its id."""

    wants_summary = True

    def __init__(self, config: TrainConfig, run_dir: Path | None, start_step: int):
        self.wandb = _require("wandb")
        # wandb ids are short lowercase alphanumerics, unique within a project
        run_id = _tracking_state(run_dir).get("wandb_run_id") or secrets.token_hex(6)
        if run_dir is not None:  # saved first: a kill during init still reuses the id
            _save_tracking_state(run_dir, {"wandb_run_id": run_id})
        kwargs = {"project": config.wandb_project, "entity": config.wandb_entity,
                  "name": config.wandb_run_name, "id": run_id, "resume": "allow",
                  # train() may run beside the caller's own wandb run: never take it over
                  "reinit": "create_new"}
        if run_dir is not None and not os.environ.get("WANDB_DIR"):
            kwargs["dir"] = str(run_dir)
        try:
            self.run = self.wandb.init(**kwargs)
        except Exception as err:  # no login, no network, a bad project name
            raise CrosscodersError(
                f"wandb could not start run {run_id} ({brief(err)}); run `wandb login`, or "
                "set WANDB_MODE=offline to log locally and `wandb sync` later"
            ) from None
        # steps up to the checkpoint were sent before; a continued online run also says
        # which steps the server holds (W&B refuses steps below that, with a warning)
        held = int(getattr(self.run, "starting_step", 0) or 0)
        self.first_step = max(start_step + 1, held)

    def log_config(self, config: dict[str, Any]) -> None:
        self.run.config.update(config, allow_val_change=True)

    def log(self, record: dict[str, Any], step: int) -> None:
        if step >= self.first_step:  # a step's records (train, eval) merge into one row
            self.run.log(_scalars(record), step=step)

    def log_summary(self, summary: TrainingSummary) -> None:
        if summary.rel_norm_F is not None:
            counts, edges = np.histogram(summary.rel_norm_F, bins=REL_NORM_BINS, range=(0, 1))
            self.run.summary["rel_norm"] = self.wandb.Histogram(np_histogram=(counts, edges))
        for name, count in summary.categories.items():
            self.run.summary[f"categories/{name}"] = count

    def flush(self) -> None:
        """wandb's service process takes each record as it is logged."""

    def close(self, ok: bool = True) -> None:
        self.run.finish(exit_code=0 if ok else 1)


def _tracking_state(run_dir: Path | None) -> dict[str, Any]:
    path = run_dir / TRACKING_FILE if run_dir is not None else None
    if path is None or not path.exists():
        return {}
    state = read_json(path, fix="delete it (the run then logs to a new wandb run)")
    return state if isinstance(state, dict) else {}


def _save_tracking_state(run_dir: Path, changes: dict[str, Any]) -> None:
    state = _tracking_state(run_dir)
    if {**state, **changes} != state:
        write_json(run_dir / TRACKING_FILE, {**state, **changes})


# ------------------------------------------------------------------------------ TensorBoard


class TensorBoardLogger:
    """TensorBoard event files in ``log_dir``; steps after ``start_step`` written before
    are purged, so a resumed run shows each step once."""

    wants_summary = True

    def __init__(self, log_dir: Path, start_step: int, resumed: bool):
        SummaryWriter = _require_summary_writer()
        # a fresh run purges everything an earlier attempt wrote into this directory
        purge_step = start_step + 1 if resumed else 0
        self.writer = SummaryWriter(str(log_dir), purge_step=purge_step)
        self.resumed = resumed

    def log_config(self, config: dict[str, Any]) -> None:
        if not self.resumed:  # written at step 0, which a resumed run never purges
            text = json.dumps(config, indent=2, default=str)
            self.writer.add_text("config", f"```\n{text}\n```", global_step=0)

    def log(self, record: dict[str, Any], step: int) -> None:
        for tag, value in _scalars(record).items():
            self.writer.add_scalar(tag, value, global_step=step)

    def log_summary(self, summary: TrainingSummary) -> None:
        if summary.rel_norm_F is not None:
            self.writer.add_histogram("rel_norm", summary.rel_norm_F, global_step=summary.step,
                                      bins=np.linspace(0, 1, REL_NORM_BINS + 1))
        for name, count in summary.categories.items():
            self.writer.add_scalar(f"categories/{name}", count, global_step=summary.step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self, ok: bool = True) -> None:
        self.writer.close()
