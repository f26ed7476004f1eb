"""Training batches prepared ahead of the step: read on a background thread, copied to the
device while the previous step computes.

A thread pulls batches from the source's own iterator (the same batches in the same order,
so resume stays exact), pins them in page-locked memory when the device is a GPU, and
hands them over through a bounded queue (host memory stays at ``depth`` batches). On CUDA
the copy of batch i+1 is issued on a side stream when batch i is handed out, so it runs on
the copy engine while step i computes; the cast to float32 happens on the device. An
exception in the thread reaches the training loop as itself, and a thread that dies
without one is reported, never waited on forever.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

import torch
from torch import Tensor

from crosscoders.errors import CrosscodersError

_POLL_S = 0.5  # how often a waiting side checks that the other is still there


class DeviceBatches:
    """Iterator of float32 batches on ``device`` from an iterator of host batches."""

    def __init__(self, batches: Iterator[Tensor], device: torch.device, depth: int = 2):
        self.device = device
        self._source = batches
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._pin = device.type == "cuda"
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._in_flight: tuple[Tensor, torch.cuda.Event] | None = None
        self._ended = False  # the source is exhausted (finite iterables)
        self._thread = threading.Thread(target=self._work, name="crosscoders-prefetch",
                                        daemon=True)
        self._thread.start()

    # ----------------------------------------------------------------- producer
    def _work(self) -> None:
        try:
            for batch in self._source:
                if self._pin:
                    batch = batch.pin_memory()
                if not self._put(("batch", batch)):
                    return
            self._put(("end", None))
        except BaseException as err:  # handed to the consumer, raised there
            self._put(("error", err))

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    # ----------------------------------------------------------------- consumer
    def _take_host(self) -> Tensor:
        if self._ended:
            raise StopIteration
        while True:
            try:
                kind, item = self._queue.get(timeout=_POLL_S)
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    raise CrosscodersError(
                        "the batch-reading thread stopped without a batch or an error; "
                        "re-run the same command to resume from the last checkpoint"
                    ) from None
                continue
            if kind == "error":
                raise item
            if kind == "end":
                self._ended = True
                raise StopIteration
            return item

    def _issue(self, host: Tensor) -> tuple[Tensor, torch.cuda.Event]:
        with torch.cuda.stream(self._stream):
            on_device = host.to(self.device, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(self._stream)
        return on_device, ready

    def __iter__(self) -> DeviceBatches:
        return self

    def __next__(self) -> Tensor:
        if self._stream is None:  # CPU: the thread already did the reading
            return _as_float(self._take_host())
        if self._in_flight is None:  # first call, or the source ended
            self._in_flight = self._issue(self._take_host())
        batch, ready = self._in_flight
        try:
            self._in_flight = self._issue(self._take_host())
        except StopIteration:
            self._in_flight = None
        current = torch.cuda.current_stream(self.device)
        current.wait_event(ready)
        batch.record_stream(current)  # its memory is reused only after this stream's work
        return _as_float(batch)

    def close(self) -> None:
        """Stop the thread (it may be blocked on a full queue) and drop pending batches."""
        self._stop.set()
        self._thread.join(timeout=10)
        self._in_flight = None


def device_batches(batches: Iterator[Tensor], device: torch.device,
                   depth: int) -> DeviceBatches | Iterator[Tensor]:
    """``batches`` prefetched ``depth`` ahead on a thread (``depth`` 0: read inline)."""
    if depth > 0:
        return DeviceBatches(batches, device, depth)
    return (_as_float(batch.to(device)) for batch in batches)


def _as_float(x: Tensor) -> Tensor:
    """float32 for half-precision batches (store dtypes); float32/64 pass through."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()
