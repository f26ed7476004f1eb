"""``harvest: {store: PATH}``: use a store made by ``crosscoders harvest`` instead of harvesting.

The store is only read, never written. Its own recorded harvest config stands in for the
``harvest`` section; models given beside ``store`` are checked to yield the store's sources
(same names and sites) from the same weights (same fingerprints) before they replace the
recorded ones.
"""

from __future__ import annotations

from pathlib import Path

from crosscoders.errors import ConfigError, DataError
from crosscoders.harvest.config import HarvestConfig, ModelSpec
from crosscoders.store import ActivationStore

# what identifies the weights' content; without any, a model is known by path and revision
CONTENT_KEYS = ("commit", "file_sha256", "fingerprint")


def open_reused_store(path: str, models: list[ModelSpec]) -> tuple[ActivationStore, HarvestConfig]:
    """The store at ``path`` and the harvest config that describes it."""
    root = Path(path).expanduser()
    try:
        store = ActivationStore.open(root)
    except DataError as err:
        raise DataError(f"harvest.store: {err}") from None
    recorded = store.manifest.get("config")
    if not isinstance(recorded, dict):
        raise DataError(f"harvest.store: {root} does not record the harvest config that made "
                        "it; harvest it again with `crosscoders harvest`")
    config = HarvestConfig.from_dict(recorded)
    if models:
        config = _with_models(store, config, list(models))
    return store, config


def _with_models(store: ActivationStore, config: HarvestConfig,
                 models: list[ModelSpec]) -> HarvestConfig:
    from crosscoders.harvest.loop import plan_harvest

    stored = [str(s.get("name")) for s in store.sources]
    if len(models) != len(config.models):
        raise ConfigError(
            f"harvest.store: {store.root} was harvested from {len(config.models)} model(s) "
            f"(sources {', '.join(stored)}) but harvest.models lists {len(models)}; make "
            "harvest.models match the store, or remove it"
        )
    config = config.replace(models=models)
    plan = plan_harvest(config)
    given = [s.name for s in plan.sources]
    if given != stored or plan.d_model != store.d_model:
        raise ConfigError(
            f"harvest.store: {store.root} holds sources {', '.join(stored)} (d_model "
            f"{store.d_model}) but harvest.models gives {', '.join(given)} (d_model "
            f"{plan.d_model}); make harvest.models match the store, or remove it"
        )
    recorded = store.manifest.get("models", [])
    for spec, name, new, old in zip(models, config.model_names(), plan.fingerprints,
                                    recorded, strict=False):
        if _weights(new) != _weights(old):
            raise ConfigError(
                f"harvest.store: model {name} at {spec.path} has other weights than the ones "
                f"{store.root} was harvested from; point harvest.models at those, or remove it"
            )
    return config


def _weights(fingerprint: dict) -> dict:
    content = {k: fingerprint[k] for k in CONTENT_KEYS if k in fingerprint}
    return content or {k: fingerprint.get(k) for k in ("path", "revision")}
