"""Streaming mode: harvest on the fly into a shuffle buffer that feeds training directly.

For data larger than the disk. The models stay loaded; nothing is written. The stream of
stored positions is the one a store would hold, repeated in epochs of ``config.tokens``
positions (or fewer if the data runs out). The first ``eval_tokens`` positions of every
epoch are the held-out split; the rest is cut into windows of ``buffer_tokens`` rows, and
each window is shuffled with a seed derived from ``(seed, window index)``. In order, its
rows are one epoch's stored positions (held-out ones first), computed as they are read;
there is no random access (``gather``, ``window``): harvest to a store for that.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from crosscoders.data import ActivationSource, StreamCursor
from crosscoders.errors import ConfigError, DataError
from crosscoders.harvest.config import HarvestConfig
from crosscoders.harvest.loop import ModelRunner, kept_positions, load_tokenizers, plan_harvest
from crosscoders.harvest.tokens import TokenStream, pick_chat_tokenizer


class StreamingSource(ActivationSource):
    """An ``ActivationSource`` that runs the models as the trainer asks for batches."""

    def __init__(self, config: HarvestConfig, buffer_tokens: int = 1 << 16) -> None:
        if config.sequential:
            raise ConfigError("streaming needs every model loaded at once; set sequential=False")
        if buffer_tokens <= 0:
            raise ConfigError(f"buffer_tokens must be positive, got {buffer_tokens}")
        self.config = config
        self.plan = plan_harvest(config)
        tokenizers = load_tokenizers(config)
        self.stream = TokenStream(config, tokenizers[0], pick_chat_tokenizer(config, tokenizers))
        self.runners = [ModelRunner(self.plan, m) for m in range(len(config.models))]
        self.n_sources = len(self.plan.sources)
        self.d_model = self.plan.d_model
        self.buffer_tokens = buffer_tokens
        e = config.eval_tokens
        self.n_eval = int(round(e * config.tokens)) if e < 1 else int(e)
        self.n_tokens = None  # known only once an epoch has been tokenised
        self.cursor = StreamCursor(lambda: self._epoch_rows(0, None), self.n_sources,
                                   self.d_model)

    def _forward(self, batch: Any, flat: np.ndarray) -> torch.Tensor:
        ids = torch.from_numpy(batch.input_ids)
        flat_t = torch.from_numpy(flat)
        parts: dict[int, torch.Tensor] = {}
        for runner in self.runners:
            parts.update(runner.run(ids, flat_t))
        return torch.stack([parts[s].float().cpu() for s in range(self.n_sources)], dim=1)

    def _epoch_rows(self, lo: int, hi: int | None, skip: int = 0) -> Iterator[torch.Tensor]:
        """Float32 rows [n, S, D] at epoch positions ``[lo + skip, hi)`` (``hi=None``: to the
        epoch's end); batches before ``lo + skip`` are tokenised but not run."""
        start = lo + skip
        position = 0
        for batch in self.stream.batches():
            flat, _ = kept_positions(batch, self.config.tokens - position)
            n = flat.size
            end = position + n if hi is None else min(position + n, hi)
            if end > start:
                a = max(start, position) - position
                yield self._forward(batch, flat[a : end - position])
            position += n
            if position >= self.config.tokens or (hi is not None and position >= hi):
                return

    def _train_rows(self, skip: int) -> Iterator[torch.Tensor]:
        """Endless training rows (epoch after epoch) from training position ``skip`` on."""
        while True:
            produced = 0
            for rows in self._epoch_rows(self.n_eval, None, skip):
                produced += rows.shape[0]
                yield rows
            if produced == 0 and skip == 0:
                raise DataError(
                    "streaming source has no training tokens: the data is empty, every position "
                    "is masked, or eval_tokens takes them all"
                )
            skip = max(0, skip - self._epoch_train_len()) if produced == 0 else 0

    def _epoch_train_len(self) -> int:
        if not hasattr(self, "_train_len"):
            total = 0
            for batch in self.stream.batches():
                total += kept_positions(batch, self.config.tokens - total)[0].size
                if total >= self.config.tokens:
                    break
            self._train_len = max(0, total - self.n_eval)
            if self._train_len == 0:
                raise DataError("streaming source has no training tokens after the eval split")
        return self._train_len

    def batches(self, batch_size: int, seed: int, start: int = 0) -> Iterator[torch.Tensor]:
        """Endless shuffled float32 batches [B, S, D]; ``start=n`` begins at batch ``n``
        (the skipped windows are tokenised, not run through the models)."""
        size = self.buffer_tokens
        window, offset = divmod(start * batch_size, size)
        rows = self._train_rows(window * size)
        carry: list[torch.Tensor] = []
        have = 0
        pending: list[torch.Tensor] = []
        while True:
            got = 0
            chunks = []
            while got < size:
                chunk = next(rows)
                chunks.append(chunk)
                got += chunk.shape[0]
            data = torch.cat(chunks)
            if got > size:  # keep the surplus for the next window
                rows = _chain([data[size:]], rows)
                data = data[:size]
            order = torch.from_numpy(np.random.default_rng([seed, window]).permutation(size))
            pending = [data[order[offset:]]]
            for part in pending:
                while part.shape[0]:
                    take = min(batch_size - have, part.shape[0])
                    carry.append(part[:take])
                    part = part[take:]
                    have += take
                    if have == batch_size:
                        yield carry[0] if len(carry) == 1 else torch.cat(carry)
                        carry, have = [], 0
            window, offset = window + 1, 0

    def eval_batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        """The first ``n_eval`` positions of the stream, in order."""
        carry: list[torch.Tensor] = []
        have = 0
        for rows in self._epoch_rows(0, self.n_eval) if self.n_eval else []:
            carry.append(rows)
            have += rows.shape[0]
            while have >= batch_size:
                joined = torch.cat(carry)
                yield joined[:batch_size]
                carry, have = [joined[batch_size:]], have - batch_size
        if have:
            yield torch.cat(carry)

    def sample(self, n_tokens: int, seed: int) -> torch.Tensor:
        """The first ``n_tokens`` training rows, in random order."""
        got, parts = 0, []
        for rows in self._train_rows(0):
            parts.append(rows)
            got += rows.shape[0]
            if got >= n_tokens:
                break
        data = torch.cat(parts)[:n_tokens]
        order = torch.from_numpy(np.random.default_rng(seed).permutation(data.shape[0]))
        return data[order]

    def mean_squared_norm(self) -> torch.Tensor | None:
        """Unknown before the data is seen: estimate it with ``sample``."""
        return None

    def describe(self) -> dict[str, Any]:
        identity = json.dumps(self.plan.identity(), sort_keys=True).encode()
        return {
            "kind": "streaming",
            "identity_sha256": hashlib.sha256(identity).hexdigest(),
            "n_sources": self.n_sources,
            "d_model": self.d_model,
            "sources": [s.name for s in self.plan.sources],
            "tokens_per_epoch": self.config.tokens,
            "n_eval": self.n_eval,
            "buffer_tokens": self.buffer_tokens,
        }

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` of an epoch in stream order (fewer at its end); reading in
        order runs the models once per row."""
        return self.cursor.read(start, stop)

    def close(self) -> None:
        for runner in self.runners:
            runner.close()
        self.runners = []


def _chain(first: list[torch.Tensor], rest: Iterator[torch.Tensor]) -> Iterator[torch.Tensor]:
    yield from first
    yield from rest
