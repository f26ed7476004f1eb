"""Cross-layer crosscoders: crosscoders whose sources are the layers of one model.

- :mod:`~crosscoders.layers.profile`: which layers each latent writes to and how far it
  persists (:func:`layer_profile`, :func:`firing_frequency`; ``crosscoders layers``);
- :mod:`~crosscoders.layers.examples`: max-activating contexts overall and per layer
  input (:class:`~crosscoders.layers.examples.LayerExampleCollector`);
- :mod:`~crosscoders.layers.study`: the ``layers`` stage of ``crosscoders run`` (profiles,
  FVU per layer, contexts, the report; :func:`run_layer_study`).
"""

from crosscoders.layers.profile import LayerProfile, firing_frequency, layer_profile
from crosscoders.layers.study import run_layer_study

__all__ = ["LayerProfile", "firing_frequency", "layer_profile", "run_layer_study"]
