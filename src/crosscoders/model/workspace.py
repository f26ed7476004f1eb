"""Named scratch buffers, reused from one call (training step, batch) to the next.

Allocating tens of MB afresh every step costs more than the arithmetic done in them (page
faults on CPU, allocator traffic on GPU), so the training step, the screened selection and
the sparse kernels take their large temporaries from a :class:`Workspace`. A buffer handed
out is overwritten by the next ``get`` of the same name: its user must be done with it by
then (for gradients written into one: ``zero_grad(set_to_none=True)`` before the next
backward, as the trainer does).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

#: a buffer that turns out too small is replaced by one this much larger than asked for, so
#: sizes that vary from call to call (the screen's candidates) settle after a few calls
GROWTH = 1.25


class Workspace:
    """Reusable buffers by name: :meth:`get` returns a view of the requested shape.

    A buffer is first allocated at the size asked for (so fixed-size buffers, like the
    [F, S*D] gradients, cost no more memory than fresh tensors) and grows when a larger
    view is asked for; asking for a smaller one reuses it. ``reuse=False`` gives a
    workspace that hands out fresh tensors and keeps nothing (see :data:`NO_REUSE`).

    Copies and pickles start empty (the buffers are a cache, never state); ``lock`` lets
    threads that share one workspace (one model encoding from several threads) take turns.
    """

    def __init__(self, reuse: bool = True) -> None:
        self.reuse = reuse
        self._buffers: dict[str, Tensor] = {}
        self._memo: dict[str, tuple[Any, Any]] = {}
        self.lock = threading.Lock()

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype,
            device: torch.device) -> Tensor:
        """An uninitialised contiguous tensor of ``shape``: a view of buffer ``name``."""
        if not self.reuse:
            return torch.empty(shape, dtype=dtype, device=device)
        n = math.prod(shape)
        buf = self._buffers.get(name)
        if buf is None or buf.dtype != dtype or not _same_device(buf.device, device):
            buf = self._buffers[name] = torch.empty(n, dtype=dtype, device=device)
        elif buf.numel() < n:
            buf = self._buffers[name] = torch.empty(int(n * GROWTH) + 1, dtype=dtype,
                                                    device=device)
        return buf[:n].view(shape)

    def cached(self, name: str, key: Any, compute: Callable[[], Any]) -> Any:
        """``compute()``, reused while ``key`` (e.g. the weights' versions) is unchanged;
        computed afresh when ``key`` is None."""
        if not self.reuse or key is None:
            return compute()
        hit = self._memo.get(name)
        if hit is not None and hit[0] == key:
            return hit[1]
        value = compute()
        self._memo[name] = (key, value)
        return value

    def names(self) -> list[str]:
        """The buffers and cached values held now."""
        return [*self._buffers, *self._memo]

    def __reduce__(self):
        return (Workspace, (self.reuse,))


#: hands out fresh tensors and keeps no reference to them (AuxK's gradients: reusing a
#: second set of [F, X] buffers would cost more memory than the page faults cost time)
NO_REUSE = Workspace(reuse=False)


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index == b.index or b.index is None)
