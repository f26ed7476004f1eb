"""Activation store: sharded, memory-mapped activations with tokens and a manifest."""

from crosscoders.store.reader import ActivationStore
from crosscoders.store.shuffle import ShufflePlan
from crosscoders.store.writer import ShardMeta, StoreWriter

__all__ = ["ActivationStore", "ShardMeta", "ShufflePlan", "StoreWriter"]
