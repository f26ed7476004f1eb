"""Activation data: the one protocol everything reads through, and its implementations.

:class:`ActivationSource` is what the trainer, the diff pass, layer profiles and the
benchmarks read. :func:`as_source` turns a tensor, array, file, store directory or
iterable into one; :class:`~crosscoders.store.ActivationStore` and the streaming harvest
implement it too. The checks (shape, NaN/inf, fingerprint) and the data-parallel split
live here as well.
"""

from crosscoders.data.checks import (
    FINGERPRINT_ROWS,
    check_activations,
    check_batch_finite,
    check_finite,
    find_nonfinite,
    fingerprint,
)
from crosscoders.data.files import load_activation_file
from crosscoders.data.iterable import IterableSource
from crosscoders.data.ordered import Head, StreamCursor, ordered_batches, ordered_stop
from crosscoders.data.protocol import RANDOM_ACCESS_FIX, ActivationSource
from crosscoders.data.shard import cut_batches, shard_rows, sharded_batches
from crosscoders.data.source import ActivationData, as_source
from crosscoders.data.tensor import TensorSource

__all__ = [
    "FINGERPRINT_ROWS",
    "RANDOM_ACCESS_FIX",
    "ActivationData",
    "ActivationSource",
    "Head",
    "IterableSource",
    "StreamCursor",
    "TensorSource",
    "as_source",
    "check_activations",
    "check_batch_finite",
    "check_finite",
    "cut_batches",
    "find_nonfinite",
    "fingerprint",
    "load_activation_file",
    "ordered_batches",
    "ordered_stop",
    "sharded_batches",
    "shard_rows",
]
