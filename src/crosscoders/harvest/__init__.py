"""Harvest: run causal LMs on text and capture residual-stream activations at chosen sites.

``harvest(config, out_dir)`` writes an activation store (``crosscoders.store``);
``StreamingSource(config)`` feeds the same activations to a trainer without a store.
"""

from crosscoders.harvest.config import DataSpec, HarvestConfig, ModelSpec
from crosscoders.harvest.loop import HarvestPlan, harvest, plan_harvest
from crosscoders.harvest.models import find_blocks, load_model, load_tokenizer
from crosscoders.harvest.sites import Site, parse_site, resolve_site
from crosscoders.harvest.streaming import StreamingSource

__all__ = [
    "DataSpec",
    "HarvestConfig",
    "HarvestPlan",
    "ModelSpec",
    "Site",
    "StreamingSource",
    "find_blocks",
    "harvest",
    "load_model",
    "load_tokenizer",
    "parse_site",
    "plan_harvest",
    "resolve_site",
]
