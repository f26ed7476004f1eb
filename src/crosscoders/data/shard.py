"""Data parallelism's split of a batch: which rows each rank trains on."""

from __future__ import annotations

import inspect
from collections.abc import Iterator

from torch import Tensor

from crosscoders.data.protocol import ActivationSource
from crosscoders.errors import DataError


def shard_rows(batch_size: int, shard: tuple[int, int] | None) -> tuple[int, int]:
    """Rows ``[lo, hi)`` of a batch that rank ``shard[0]`` of ``shard[1]`` trains on.

    The global batch is the same rows a single process reads; rank r takes the r-th of
    ``world`` equal consecutive slices of it.
    """
    if shard is None:
        return 0, batch_size
    rank, world = shard
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside a world of {world}")
    if batch_size % world:
        raise DataError(
            f"a batch of {batch_size} rows cannot be split evenly over {world} data-parallel "
            f"processes; use a batch size divisible by {world} (e.g. "
            f"{max(world, batch_size // world * world)}) or another number of processes"
        )
    part = batch_size // world
    return rank * part, (rank + 1) * part


def sharded_batches(source: ActivationSource, batch_size: int, seed: int, start: int = 0,
                    shard: tuple[int, int] | None = None) -> Iterator[Tensor]:
    """``source.batches`` for one rank: the source's own sharded reads where it has them
    (a ``shard`` parameter), else its whole batches cut down to the rank's rows."""
    if shard is None or shard[1] == 1:
        return source.batches(batch_size, seed, start=start)
    shard_rows(batch_size, shard)  # refuse an uneven split before reading anything
    if "shard" in inspect.signature(source.batches).parameters:
        return source.batches(batch_size, seed, start=start, shard=shard)
    return cut_batches(source.batches(batch_size, seed, start=start), shard)


def cut_batches(batches: Iterator[Tensor], shard: tuple[int, int]) -> Iterator[Tensor]:
    """Each whole batch cut down to the rows rank ``shard[0]`` trains on."""
    for batch in batches:
        lo, hi = shard_rows(batch.shape[0], shard)
        yield batch[lo:hi]
