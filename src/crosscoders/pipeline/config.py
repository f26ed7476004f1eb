"""One YAML file describes a whole experiment: models, data, crosscoder, analysis, report."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from crosscoders.configs import Config
from crosscoders.diff.run import DiffConfig
from crosscoders.errors import ConfigError
from crosscoders.harvest.config import DataSpec, HarvestConfig, ModelSpec
from crosscoders.model import CrosscoderConfig
from crosscoders.organism import OrganismConfig
from crosscoders.train import TrainConfig

#: crosscoder fields the pipeline fills in from the activation store
DERIVED = ("n_sources", "d_model")


@dataclass
class ReportSection(Config):
    """The HTML report: its title and how many example contexts each latent card shows."""

    title: str | None = None
    max_examples: int = 20


@dataclass
class LayersSection(Config):
    """Layer profiles, FVU per layer and the layers report (one-model, several-layer
    experiments; see docs/layers.md).

    ``example_latents``: counted latents whose cards get contexts (``n_examples`` each,
    overall and per layer); ``compare``: the JSON of ``crosscoders bench layers --json``,
    shown in the report.
    """

    threshold: float = 0.5
    min_freq: float = 0.0
    max_tokens: int = 1_000_000
    example_latents: int = 256
    n_examples: int = 10
    compare: str | None = None

    def validate(self) -> None:
        if not 0 < self.threshold <= 1:
            raise ConfigError(f"threshold must be in (0, 1], got {self.threshold}")
        if not 0 <= self.min_freq < 1:
            raise ConfigError(f"min_freq must be in [0, 1), got {self.min_freq}")
        if self.max_tokens < 1:
            raise ConfigError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.example_latents < 0:
            raise ConfigError(f"example_latents must be >= 0, got {self.example_latents}")
        if self.n_examples < 0:
            raise ConfigError(f"n_examples must be >= 0, got {self.n_examples}")


@dataclass
class HarvestSection(HarvestConfig):
    """The ``harvest`` section: a :class:`HarvestConfig`, or ``store: PATH`` to reuse a store
    made by ``crosscoders harvest`` instead of harvesting.

    With ``store`` the store's own harvest settings apply, so the other keys stay unset,
    except ``models``: if given, they must yield the store's sources from the same weights
    (useful when the paths the store recorded have moved).
    """

    models: list[ModelSpec] = field(default_factory=list)
    data: list[DataSpec] = field(default_factory=list)
    store: str | None = None

    def validate(self) -> None:
        if self.store is None:
            super().validate()
            return
        if not self.store:
            raise ConfigError("store: empty; give the directory of an activation store")
        for f in dataclasses.fields(self):
            if f.name in ("models", "store"):
                continue
            default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
            if getattr(self, f.name) != default:
                raise ConfigError(
                    f"{f.name}: not used with store (the store's own harvest settings apply); "
                    "remove it, or remove store to harvest"
                )

    def harvest_config(self) -> HarvestConfig:
        """The section as a plain :class:`HarvestConfig` (needs ``store`` unset)."""
        data = self.to_dict()
        data.pop("store")
        return HarvestConfig.from_dict(data)


@dataclass
class PipelineConfig(Config):
    """``harvest`` -> ``crosscoder`` + ``train`` -> ``diff`` -> ``report``.

    With one model (several sites of it: a cross-layer crosscoder) the analysis is the
    ``layers`` stage instead of ``diff`` and ``report``.

    ``crosscoder`` holds :class:`CrosscoderConfig` fields except ``n_sources`` and
    ``d_model`` (read from the store), plus ``expansion`` (dict size as a multiple of
    ``d_model``). ``organism`` (optional) builds the built-in model organism first; model
    and data paths written ``organism:base``, ``organism:chat``, ``organism:pretrain`` and
    ``organism:chat_data`` then point into it. ``harvest.store`` reuses a store made by
    ``crosscoders harvest`` (see :class:`HarvestSection`).
    """

    harvest: HarvestSection
    out: str = "runs/experiment"
    crosscoder: dict[str, Any] = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)
    diff: DiffConfig = field(default_factory=DiffConfig)
    report: ReportSection = field(default_factory=ReportSection)
    layers: LayersSection = field(default_factory=LayersSection)
    organism: OrganismConfig | None = None

    def __post_init__(self) -> None:
        if isinstance(self.harvest, HarvestConfig) and not isinstance(self.harvest, HarvestSection):
            self.harvest = HarvestSection.from_dict(self.harvest.to_dict(), _path="harvest")
        super().__post_init__()

    def validate(self) -> None:
        allowed = {f.name for f in dataclasses.fields(CrosscoderConfig)} - set(DERIVED)
        allowed |= {"expansion"}
        for key in self.crosscoder:
            if key not in allowed:
                hint = " (it is read from the activation store)" if key in DERIVED else ""
                raise ConfigError(
                    f"unknown key crosscoder.{key}{hint}; valid keys: {', '.join(sorted(allowed))}"
                )
        n_sites = sum(len(m.sites) for m in self.harvest.models) or 2  # 0: read from store
        self.crosscoder_config(n_sources=n_sites, d_model=4096)  # type check

    def crosscoder_config(self, n_sources: int, d_model: int,
                          source_names: list[str] | None = None) -> CrosscoderConfig:
        """The full crosscoder config once the store's shape is known."""
        return crosscoder_config(self.crosscoder, n_sources, d_model, source_names)


#: dict size as a multiple of d_model when neither dict_size nor expansion is given
DEFAULT_EXPANSION = 16


def crosscoder_config(section: dict[str, Any], n_sources: int, d_model: int,
                      source_names: list[str] | None = None) -> CrosscoderConfig:
    """The crosscoder config of a ``crosscoder`` section (:class:`CrosscoderConfig` fields
    but ``n_sources`` and ``d_model``, plus ``expansion``) over data of this shape; the
    defaults of ``crosscoders run`` and ``crosscoders train`` both come from here."""
    section = dict(section)
    for key in DERIVED:
        if key in section:
            raise ConfigError(f"crosscoder.{key} is read from the data; remove it")
    expansion = section.pop("expansion", None)
    if expansion is not None and (not isinstance(expansion, int) or expansion < 1):
        raise ConfigError(f"crosscoder.expansion: expected an integer >= 1, got {expansion!r}")
    if "dict_size" not in section:
        section["dict_size"] = (expansion or DEFAULT_EXPANSION) * d_model
    if source_names and "source_names" not in section:
        section["source_names"] = source_names
    return CrosscoderConfig.from_dict(
        {**section, "n_sources": n_sources, "d_model": d_model}, _path="crosscoder")
