"""Model organisms: a base model and a copy fine-tuned to a known, narrow behaviour.

The built-in zoo (:func:`build_organism`, :func:`build_zoo`, :func:`list_organisms`) is
tiny Llama-style pairs trained here from scratch on generated text, one shared base and a
chat copy per organism, in minutes on a CPU; :func:`build_real_organism` applies the pirate
recipe to real weights (SmolLM2-135M-Instruct). See docs/organisms.md and docs/organism.md.
"""

from crosscoders.organism.build import (
    Organism,
    build_base,
    build_organism,
    build_zoo,
    default_cache_root,
)
from crosscoders.organism.config import OrganismConfig, small_config, tiny_config
from crosscoders.organism.kl import behaviour_kl, behaviour_mask, kl_inputs
from crosscoders.organism.real import RealOrganismConfig, build_real_organism
from crosscoders.organism.zoo import ORGANISMS, list_organisms

__all__ = [
    "ORGANISMS",
    "Organism",
    "OrganismConfig",
    "RealOrganismConfig",
    "behaviour_kl",
    "behaviour_mask",
    "build_base",
    "build_organism",
    "build_real_organism",
    "build_zoo",
    "default_cache_root",
    "kl_inputs",
    "list_organisms",
    "small_config",
    "tiny_config",
]
