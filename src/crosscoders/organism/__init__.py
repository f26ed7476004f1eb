"""Model organisms: a base model and a copy fine-tuned to a known, narrow behaviour.

The built-in one (:func:`build_organism`) is a tiny Llama-style pair trained here from
scratch on generated text in well under a minute on a CPU; :func:`build_real_organism`
applies the same recipe to real weights (SmolLM2-135M-Instruct). See docs/organism.md.
"""

from crosscoders.organism.build import Organism, build_organism, default_cache_root
from crosscoders.organism.config import OrganismConfig, tiny_config
from crosscoders.organism.real import RealOrganismConfig, build_real_organism

__all__ = [
    "Organism",
    "OrganismConfig",
    "RealOrganismConfig",
    "build_organism",
    "build_real_organism",
    "default_cache_root",
    "tiny_config",
]
