"""Activation store: sharded, memory-mapped activations with tokens and a manifest."""

from crosscoders.data import ActivationSource
from crosscoders.store.reader import ActivationStore
from crosscoders.store.shuffle import ShufflePlan
from crosscoders.store.writer import ShardMeta, StoreWriter

__all__ = ["ActivationSource", "ActivationStore", "ShardMeta", "ShufflePlan", "StoreWriter"]
