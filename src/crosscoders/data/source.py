"""The single entry point: turn what a user passes into an :class:`ActivationSource`."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from torch import Tensor

from crosscoders.data.files import load_activation_file
from crosscoders.data.iterable import IterableSource
from crosscoders.data.protocol import ActivationSource
from crosscoders.data.tensor import TensorSource
from crosscoders.errors import DataError

#: what :func:`as_source` reads: a tensor or array [N, S, D], a ``.safetensors``/``.pt``/
#: ``.npy`` file, an activation-store directory, an iterable of [B, S, D] batches, or a source
ActivationData = Tensor | np.ndarray | str | Path | ActivationSource | Iterable[Tensor]


def as_source(
    data: ActivationData,
    n_eval: int = 0,
    batch_size: int = 1,
    token_ids: Tensor | np.ndarray | Sequence[int] | None = None,
    doc_ids: Tensor | np.ndarray | Sequence[int] | None = None,
) -> ActivationSource:
    """A tensor or array [N, S, D], a ``.safetensors``/``.pt``/``.npy`` file, an activation
    store directory, an iterable of [B, S, D] batches, or a source (returned as it is).

    ``n_eval``: tokens held out for the trainer (a store keeps its own split; an iterable
    holds out whole batches of ``batch_size``). ``token_ids`` and ``doc_ids`` [N] describe
    the rows of a tensor (see :class:`TensorSource`).
    """
    if isinstance(data, (Tensor, np.ndarray)):
        return TensorSource(data, n_eval, token_ids=token_ids, doc_ids=doc_ids)
    if isinstance(data, (str, Path)):
        path = Path(data)
        if path.is_dir():
            from crosscoders.store import ActivationStore  # the store reads this package

            return ActivationStore.open(path)
        return TensorSource(load_activation_file(path), n_eval, name=str(path),
                            token_ids=token_ids, doc_ids=doc_ids)
    if isinstance(data, ActivationSource):
        return data
    if isinstance(data, Iterable):
        return IterableSource(data, max(0, -(-n_eval // max(batch_size, 1))) if n_eval else 0)
    raise DataError(
        f"cannot read activations from a {type(data).__name__}: pass a tensor [N, S, D], a "
        ".safetensors/.pt/.npy file, an activation-store directory, an iterable of [B, S, D] "
        "batches, or a subclass of crosscoders.data.ActivationSource"
    )
