"""Max-activating examples per latent, collected in one pass with bounded memory.

For each latent of a subset the collector keeps

- the ``n_top`` highest activations (``kind = "top"``), and
- a uniform random sample of ``n_samples`` of its firings (``kind = "sample"``), drawn with
  random keys (keep the smallest keys: a bottom-k sketch, i.e. sampling without
  replacement). Each sample's ``quantile`` is its rank among the sampled values, an
  estimate of where it sits in the latent's activation distribution; the low quantiles are
  the "what does it do when it fires weakly" examples.

Both use the same machinery: candidates above the current per-latent cut-off are appended
to a buffer, which is compacted (sorted, top per latent kept, cut-offs raised) when full.
State is O(latents * (n_top + n_samples)) plus the buffer, independent of the data size.

:meth:`ExampleCollector.finish` then reads the context window around each kept row (token
ids and the latent's activation on every stored token of the window) and
:func:`save_examples` writes them to SQLite (``examples.db``), queryable with
:func:`load_examples` or any SQLite client.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from crosscoders.data import as_source
from crosscoders.diff.stats import EncodedBatch, analysis_pass
from crosscoders.errors import ConfigError
from crosscoders.io import atomic_write

if TYPE_CHECKING:
    from crosscoders.data import ActivationData, ActivationSource
    from crosscoders.model import Crosscoder


class TopPerGroup:
    """The ``n`` largest ``score`` entries of each of ``n_groups`` groups, kept while streaming.

    ``add`` takes candidates (group, score, and the payload: value, row) and keeps only
    those above their group's current cut-off; once more than ``cap`` are buffered,
    ``compact`` sorts them, keeps the top ``n`` per group and raises the cut-offs, so the
    state stays O(n_groups * n + cap). ``compact`` also returns the kept entries (group,
    score, value, row), by group and then strongest first. Scores are float64.
    """

    def __init__(self, n_groups: int, n: int, cap: int) -> None:
        self.n, self.cap = n, cap
        self.cut_G = torch.full((n_groups,), -torch.inf, dtype=torch.float64)
        self.parts: list[tuple[Tensor, Tensor, Tensor, Tensor]] = []
        self.size = 0

    def add(self, g: Tensor, score: Tensor, value: Tensor, row: Tensor) -> None:
        idx = (score > self.cut_G[g]).nonzero().squeeze(1)  # one scan, then integer gathers
        if idx.numel() == 0:
            return
        self.parts.append((g[idx], score[idx], value[idx], row[idx]))
        self.size += idx.numel()
        if self.size > self.cap:
            self.compact()

    def compact(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        if not self.parts:
            e = torch.empty(0)
            return e.long(), e.double(), e.double(), e.long()
        g, score, value, row = (torch.cat(t) for t in zip(*self.parts))
        order = torch.argsort(score, descending=True, stable=True)
        order = order[torch.argsort(g[order], stable=True)]
        g, score, value, row = g[order], score[order], value[order], row[order]
        counts = torch.bincount(g, minlength=len(self.cut_G))
        start = torch.cumsum(counts, 0) - counts
        rank = torch.arange(len(g)) - start[g]
        keep = rank < self.n
        g, score, value, row, rank = g[keep], score[keep], value[keep], row[keep], rank[keep]
        full = rank == self.n - 1
        self.cut_G[g[full]] = score[full]
        self.parts = [(g, score, value, row)]
        self.size = len(g)
        return g, score, value, row


class ExampleCollector:
    """Analysis-pass consumer collecting top and sampled activations of ``latents``."""

    def __init__(self, n_latents: int, latents: Any = None, n_top: int = 10,
                 n_samples: int = 10, seed: int = 0, buffer: int = 1 << 18) -> None:
        if n_top < 0 or n_samples < 0 or n_top + n_samples == 0:
            raise ConfigError(f"need n_top, n_samples >= 0 and not both 0; got {n_top}, "
                              f"{n_samples}")
        idx = np.arange(n_latents) if latents is None else np.unique(np.asarray(latents))
        if idx.size and (idx.min() < 0 or idx.max() >= n_latents):
            raise ConfigError(f"latent indices must lie in [0, {n_latents})")
        self.latents = torch.as_tensor(idx, dtype=torch.long)
        self.pos_F = torch.full((n_latents,), -1, dtype=torch.long)
        self.pos_F[self.latents] = torch.arange(len(idx))
        cap = max(buffer, 4 * len(idx) * max(n_top, n_samples))
        self.top = TopPerGroup(len(idx), n_top, cap) if n_top else None
        self.samples = TopPerGroup(len(idx), n_samples, cap) if n_samples else None
        self.gen = torch.Generator().manual_seed(seed)

    def update(self, batch: EncodedBatch) -> None:
        codes = batch.codes.to("cpu")
        if len(self.latents) < len(self.pos_F):  # a subset: its entries, by position in it
            codes = codes.on_latents(self.pos_F, len(self.latents))
        g, v, row = codes.latent_E, codes.value_E.double(), codes.token_E + batch.row0
        if self.top is not None:
            self.top.add(g, v, v, row)
        if self.samples is not None:
            key = -torch.rand(len(g), generator=self.gen, dtype=torch.float64)
            self.samples.add(g, key, v, row)

    def records(self, latents: Any = None) -> list[dict[str, Any]]:
        """One record per kept activation: latent, kind, rank, value, quantile, row
        (only of ``latents``, if given)."""
        wanted = None if latents is None else {int(i) for i in np.asarray(latents).ravel()}
        out: list[dict[str, Any]] = []
        for kind, keeper in (("top", self.top), ("sample", self.samples)):
            if keeper is None:
                continue
            g, _, value, row = keeper.compact()
            if kind == "sample":  # order samples by value, and estimate their quantile
                order = torch.argsort(value, descending=True, stable=True)
                order = order[torch.argsort(g[order], stable=True)]
                g, value, row = g[order], value[order], row[order]
            counts = torch.bincount(g, minlength=len(self.latents))
            start = torch.cumsum(counts, 0) - counts
            rank = torch.arange(len(g)) - start[g]
            for gi, vi, ri, k in zip(g.tolist(), value.tolist(), row.tolist(), rank.tolist()):
                latent = int(self.latents[gi])
                if wanted is not None and latent not in wanted:
                    continue
                q = 1.0 - (k + 0.5) / int(counts[gi]) if kind == "sample" else None
                out.append({"latent": latent, "kind": kind, "rank": k,
                            "value": vi, "quantile": q, "row": ri})
        return out

    @torch.inference_mode()
    def finish(self, model: Crosscoder, data: ActivationData, before: int = 16, after: int = 4,
               tokenizer: Any = None, batch_size: int = 4096,
               latents: Any = None) -> list[dict[str, Any]]:
        """Records with their context windows: ``tokens`` (ids), ``center`` (index of the
        row in them), ``acts`` (the latent's activation per window token; None where the
        position was not stored, e.g. BOS) and ``text`` (token strings, with a tokenizer).
        ``latents``: keep only these (e.g. the ones whose category, known after the pass,
        asks for examples).

        Windows are encoded in chunks of ``batch_size`` rows, so memory stays bounded.
        """
        source = as_source(data)
        recs = self.records(latents)
        windows = [source.window(r["row"], before, after) for r in recs]
        model.eval()
        chunk: list[int] = []
        n_rows = 0
        for i, rec in enumerate(recs):
            ids, wrows, center = windows[i]
            rec.update(tokens=[int(t) for t in ids], center=int(center), acts=None, text=None)
            if tokenizer is not None:
                rec["text"] = tokenizer.convert_ids_to_tokens([int(t) for t in ids if t >= 0])
            chunk.append(i)
            n_rows += int((wrows >= 0).sum())
            if n_rows >= batch_size:
                self._window_acts(model, source, recs, windows, chunk)
                chunk, n_rows = [], 0
        if chunk:
            self._window_acts(model, source, recs, windows, chunk)
        return recs

    @staticmethod
    def _window_acts(model: Crosscoder, source: ActivationSource, recs: list, windows: list,
                    chunk: list[int]) -> None:
        need = np.unique(np.concatenate([windows[i][1][windows[i][1] >= 0] for i in chunk]))
        x = source.gather(need).to(device=model.W_dec.device, dtype=model.W_dec.dtype)
        f_BF = model.encode(x).cpu()
        where = {int(r): k for k, r in enumerate(need)}
        for i in chunk:
            latent = recs[i]["latent"]
            recs[i]["acts"] = [float(f_BF[where[int(r)], latent]) if r >= 0 else None
                               for r in windows[i][1]]


def collect_examples(
    model: Crosscoder,
    data: ActivationData,
    latents: Any = None,
    n_top: int = 10,
    n_samples: int = 10,
    before: int = 16,
    after: int = 4,
    token_ids: Any = None,
    doc_ids: Any = None,
    tokenizer: Any = None,
    seed: int = 0,
    batch_size: int = 4096,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Top and sampled activating examples with context for ``latents`` (default all)."""
    source = as_source(data, token_ids=token_ids, doc_ids=doc_ids)
    collector = ExampleCollector(model.dict_size, latents, n_top, n_samples, seed)
    analysis_pass(model, source, [collector], batch_size, progress=progress, desc="examples")
    return collector.finish(model, source, before, after, tokenizer)


_SCHEMA = """
CREATE TABLE examples (
    latent INTEGER NOT NULL, kind TEXT NOT NULL, rank INTEGER NOT NULL, value REAL NOT NULL,
    quantile REAL, row INTEGER NOT NULL, center INTEGER, tokens TEXT, acts TEXT, text TEXT
);
CREATE INDEX examples_latent ON examples (latent, kind, rank);
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT);
"""


def save_examples(records: list[dict[str, Any]], path: str | Path,
                  meta: dict[str, Any] | None = None) -> Path:
    """Write records to a SQLite file (atomically): table ``examples``, one row per example
    (``tokens``, ``acts``, ``text`` as JSON lists), and table ``meta``."""
    path = Path(path)

    def write(tmp: str) -> None:
        Path(tmp).unlink(missing_ok=True)
        con = sqlite3.connect(tmp)
        try:
            con.executescript(_SCHEMA)
            con.executemany(
                "INSERT INTO examples VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(r["latent"], r["kind"], r["rank"], r["value"], r.get("quantile"), r["row"],
                  r.get("center"), json.dumps(r.get("tokens")), json.dumps(r.get("acts")),
                  json.dumps(r.get("text"))) for r in records],
            )
            con.executemany("INSERT INTO meta VALUES (?, ?)",
                            [(k, json.dumps(v)) for k, v in (meta or {}).items()])
            con.commit()
        finally:
            con.close()

    atomic_write(path, write)
    return path


def load_examples(path: str | Path, latent: int | None = None, kind: str | None = None,
                  max_quantile: float | None = None) -> list[dict[str, Any]]:
    """Examples from :func:`save_examples`, filtered by latent, kind and quantile."""
    where, args = [], []
    for clause, value in (("latent = ?", latent), ("kind = ?", kind),
                          ("quantile <= ?", max_quantile)):
        if value is not None:
            where.append(clause)
            args.append(value)
    sql = "SELECT * FROM examples" + (" WHERE " + " AND ".join(where) if where else "")
    con = sqlite3.connect(str(path))
    try:
        con.row_factory = sqlite3.Row
        rows = con.execute(sql + " ORDER BY latent, kind DESC, rank", args).fetchall()
    finally:
        con.close()
    out = []
    for r in rows:
        rec = dict(r)
        for key in ("tokens", "acts", "text"):
            rec[key] = json.loads(rec[key]) if rec[key] is not None else None
        out.append(rec)
    return out
