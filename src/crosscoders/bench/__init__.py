"""Ground-truth benchmarks: crosscoders trained on planted features, scored against them.

One module per ``crosscoders bench`` command:

- ``synthetic``: feature recovery and diffing labels on planted base/chat features;
- ``diffing``: L1 vs BatchTopK, with and without Latent Scaling, on planted cases that make
  L1 fail;
- ``layers``: a cross-layer crosscoder vs one SAE per layer at matched FVU.

The benchmarks use the library (``crosscoders.diff``, ``crosscoders.train``); nothing in the
library imports them.
"""
