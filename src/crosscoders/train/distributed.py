"""Data-parallel training: one crosscoder trained by the N processes ``torchrun`` starts.

Every rank holds the whole model and trains on its slice of each global batch (rows
``[r * B / N, (r + 1) * B / N)``, see :func:`crosscoders.data.shard_rows`). The loss is
normalised by the global batch, so the sum of the ranks' gradients is the gradient one
process would compute on the whole batch; :class:`GradientReducer` sums them once per step,
bucket by bucket as backward produces them. Selections and statistics that span the batch
(BatchTopK's cut, AuxK's residual variance, the dead-latent mask, logged metrics) are
reduced so every rank sees the global value. NCCL carries the collectives on CUDA (each
rank on ``cuda:LOCAL_RANK``), gloo on CPU. docs/scaling.md has the design.
"""

from __future__ import annotations

import datetime
import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import Tensor

from crosscoders.errors import ConfigError, CrosscodersError

#: environment variables torchrun sets for every process it starts
LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
#: parameters with at least this many elements get a bucket of their own
OWN_BUCKET_NUMEL = 1 << 16


class PeerLost(CrosscodersError):
    """Another process of a data-parallel run stopped or stopped answering."""


def launched_by_torchrun() -> bool:
    return all(name in os.environ for name in LAUNCH_ENV)


def resolve_parallel(mode: str) -> str:
    """``none`` or ``data`` for the setting ``train.parallel`` in this process."""
    launched = launched_by_torchrun()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if mode == "auto":
        return "data" if launched else "none"
    if mode == "data" and not launched:
        raise ConfigError(
            "train.parallel is 'data' but this process was not started by torchrun; launch "
            "with `torchrun --nproc-per-node N -m crosscoders ...`, or set parallel: none"
        )
    if mode == "none" and launched and world > 1:
        raise ConfigError(
            f"train.parallel is 'none' but torchrun started {world} processes, which would "
            "all write the same run directory; drop --parallel none / parallel: none to train "
            "data-parallel, or launch without torchrun"
        )
    return mode


class DataParallel:
    """This process's place in a data-parallel run, and the collectives the trainer uses.

    With one process (``torchrun --nproc-per-node 1``) every collective is the identity
    and no process group is made. A collective that fails because another rank stopped or
    timed out raises :class:`PeerLost`, one line naming the fix.
    """

    def __init__(self, rank: int, world_size: int, local_rank: int, device: torch.device,
                 timeout: datetime.timedelta, owns_group: bool = False):
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.device = device
        self.timeout = timeout
        self.owns_group = owns_group

    # ----------------------------------------------------------------- set-up
    @classmethod
    def from_env(cls, device_setting: str, timeout_minutes: float) -> DataParallel:
        """Join the process group torchrun set up (made here unless it exists already)."""
        rank = int(os.environ["RANK"])
        world = int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ["LOCAL_RANK"])
        device = _rank_device(device_setting, local_rank, world)
        timeout = datetime.timedelta(minutes=timeout_minutes)
        owns = False
        if world > 1 and not dist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            if backend == "nccl" and not dist.is_nccl_available():
                raise CrosscodersError(
                    "data-parallel training on CUDA needs NCCL, which this torch build lacks; "
                    "install a CUDA build of torch with NCCL, or train on cpu (device: cpu "
                    "uses gloo)"
                )
            try:
                dist.init_process_group(backend, timeout=timeout,
                                        device_id=device if device.type == "cuda" else None)
            except Exception as err:
                raise PeerLost(
                    f"rank {rank} could not join the {world} data-parallel processes "
                    f"({_first_line(err)}); start all of them with the same torchrun command"
                ) from None
            owns = True
        return cls(rank, world, local_rank, device, timeout, owns)

    def close(self) -> None:
        """Leave the process group if this object made it."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
        self.owns_group = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def shard(self) -> tuple[int, int]:
        return self.rank, self.world_size

    def describe(self) -> dict:
        return {"mode": "data", "world_size": self.world_size}

    # ----------------------------------------------------------------- collectives
    @contextmanager
    def _guard(self, what: str) -> Iterator[None]:
        try:
            yield
        except CrosscodersError:
            raise
        except Exception as err:  # the backend's error for a dead, or silent, peer
            minutes = self.timeout.total_seconds() / 60
            raise PeerLost(
                f"rank {self.rank} of {self.world_size}: {what} failed because another "
                f"data-parallel process stopped or did not answer within {minutes:g} min "
                f"({_first_line(err)}); the last checkpoint is kept: run the same command "
                "again to resume (see that process's own error for the cause)"
            ) from None

    def all_reduce_(self, tensor: Tensor, op: str = "sum", what: str = "a reduction") -> Tensor:
        """Reduce ``tensor`` in place over the ranks (``sum``, ``max`` or ``min``)."""
        if self.world_size > 1:
            red = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX,
                   "min": dist.ReduceOp.MIN}[op]
            with self._guard(what):
                dist.all_reduce(tensor, op=red)
        return tensor

    def gather_values(self, values_E: Tensor, what: str = "gathering values") -> list[Tensor]:
        """Every rank's 1-D ``values_E``, in rank order (their lengths may differ)."""
        if self.world_size == 1:
            return [values_E]
        with self._guard(what):
            n = torch.tensor([values_E.numel()], dtype=torch.long, device=values_E.device)
            sizes = [torch.empty_like(n) for _ in range(self.world_size)]
            dist.all_gather(sizes, n)
            counts = [int(s) for s in sizes]
            padded = values_E.new_zeros(max(counts))
            padded[: values_E.numel()] = values_E
            parts = [torch.empty_like(padded) for _ in range(self.world_size)]
            dist.all_gather(parts, padded)
        return [p[:c] for p, c in zip(parts, counts)]

    def broadcast_(self, tensors: Sequence[Tensor], what: str = "sharing rank 0's state") -> None:
        """Overwrite ``tensors`` with rank 0's (in place)."""
        if self.world_size == 1:
            return
        with self._guard(what):
            for tensor in tensors:
                dist.broadcast(tensor, src=0)

    def gather_objects(self, obj, what: str = "comparing the ranks' settings") -> list:
        if self.world_size == 1:
            return [obj]
        out = [None] * self.world_size
        with self._guard(what):
            dist.all_gather_object(out, obj)
        return out

    def barrier(self, what: str = "waiting for the other processes") -> None:
        if self.world_size > 1:
            with self._guard(what):
                dist.barrier()


def global_top(dp: DataParallel, values_E: Tensor, n_keep: int,
               parts: list[Tensor] | None = None) -> Tensor:
    """Bool mask of this rank's share of the ``n_keep`` largest of all ranks' values.

    The ranks gather the values (or pass ``parts``, already gathered) and keep what is above
    the ``n_keep``-th largest; entries equal to it are shared out in rank order, so exactly
    ``n_keep`` are kept in all (all of them when the ranks hold no more), however coarse the
    values (bf16 scores tie often).
    """
    parts = parts if parts is not None else dp.gather_values(
        values_E, "the global BatchTopK selection")
    every = torch.cat(parts)
    if every.numel() <= n_keep:
        return torch.ones_like(values_E, dtype=torch.bool)
    cut = torch.topk(every, n_keep, sorted=False).values.min()
    above = int(sum(int((p > cut).sum()) for p in parts))
    ties_before = sum(int((p == cut).sum()) for p in parts[: dp.rank])
    keep = values_E > cut
    tied = torch.nonzero(values_E == cut).squeeze(1)
    allowed = max(0, min(tied.numel(), n_keep - above - ties_before))
    keep[tied[:allowed]] = True
    return keep


class GradientReducer:
    """Sums the parameters' gradients over the ranks once per backward.

    Large parameters get a bucket each; the rest (and the step's extra statistics, see
    :meth:`finish`) share one flat bucket. A bucket's all-reduce starts, asynchronously, as
    soon as backward has accumulated all of its gradients, so it overlaps with the rest of
    backward; buckets always start in the same order on every rank (a bucket that is ready
    early waits for the ones before it), so the ranks' collectives pair up.
    """

    def __init__(self, dp: DataParallel, params: Sequence[torch.nn.Parameter]):
        self.dp = dp
        params = [p for p in params if p.requires_grad]
        # backward produces gradients roughly in reverse registration order
        big = [p for p in reversed(params) if p.numel() >= OWN_BUCKET_NUMEL]
        self.buckets: list[list[torch.nn.Parameter]] = [[p] for p in big]
        self.flat = [p for p in params if p.numel() < OWN_BUCKET_NUMEL]
        self._bucket_of = {id(p): i for i, b in enumerate(self.buckets) for p in b}
        self._ready: set[int] = set()
        self._next = 0
        self._works: list = []
        self._armed = False
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad) for p in big]

    def arm(self) -> None:
        """Call before backward."""
        self._ready.clear()
        self._next, self._works, self._armed = 0, [], True

    def _on_grad(self, param: torch.nn.Parameter) -> None:
        if not self._armed or self.dp.world_size == 1:
            return
        self._ready.add(self._bucket_of[id(param)])
        while self._next < len(self.buckets) and self._next in self._ready:
            self._launch(self._next)
            self._next += 1

    def _launch(self, index: int) -> None:
        (param,) = self.buckets[index]
        if param.grad is None:  # no gradient on this rank: add zeros, as the others expect
            param.grad = torch.zeros_like(param)
        with self.dp._guard("the gradient all-reduce"):
            self._works.append(dist.all_reduce(param.grad, async_op=True))

    def finish(self, extras: Sequence[Tensor] = ()) -> list[Tensor]:
        """Wait for every gradient's sum; also sum ``extras`` (flat float tensors, e.g. the
        loss and the fired-latent mask) in the flat bucket. Returns the summed extras."""
        self._armed = False
        if self.dp.world_size == 1:
            return list(extras)
        for index in range(self._next, len(self.buckets)):
            self._launch(index)
        for p in self.flat:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        parts = [p.grad.reshape(-1) for p in self.flat] + [e.reshape(-1).to(
            self.flat[0].dtype if self.flat else e.dtype) for e in extras]
        flat = torch.cat(parts) if parts else None
        with self.dp._guard("the gradient all-reduce"):
            if flat is not None:
                self._works.append(dist.all_reduce(flat, async_op=True))
            for work in self._works:
                work.wait()
        self._works = []
        if flat is None:
            return []
        out, pos = [], 0
        for p in self.flat:
            p.grad.copy_(flat[pos: pos + p.numel()].view_as(p.grad))
            pos += p.numel()
        for e in extras:
            out.append(flat[pos: pos + e.numel()].view_as(e).to(e.dtype))
            pos += e.numel()
        return out

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()


def _rank_device(setting: str, local_rank: int, world: int) -> torch.device:
    """``cuda:LOCAL_RANK`` for auto/cuda where CUDA is available, else the CPU."""
    if setting == "auto":
        setting = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(setting)
    except RuntimeError:
        raise ConfigError(f"unknown device {setting!r}; use auto, cpu or cuda") from None
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise ConfigError("device 'cuda' requested but CUDA is not available; use cpu")
    if device.index is not None and world > 1:
        raise ConfigError(
            f"device {setting!r} names one GPU but {world} data-parallel processes run; use "
            "device cuda (each process takes cuda:LOCAL_RANK)"
        )
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise ConfigError(
            f"process {local_rank} on this node needs cuda:{local_rank} but {count} GPU(s) are "
            f"visible; start at most {count} processes per node (--nproc-per-node {count})"
        )
    device = torch.device("cuda", local_rank)
    torch.cuda.set_device(device)
    return device


def _first_line(err: BaseException) -> str:
    """The backend's message, short: first line, no source location, at most 120 chars."""
    text = str(err).strip().splitlines()
    line = re.sub(r"^\[[^\]]*\]\s*", "", text[0]) if text else ""
    line = line or type(err).__name__
    return line if len(line) <= 120 else line[:117] + "..."
