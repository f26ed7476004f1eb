"""Turn documents into model inputs: tokenise, mix datasets, pack into contexts, mask rows.

The stream is deterministic: the same config and data give the same contexts in the same
order, so a resumed harvest can skip to any context index by re-tokenising (no forward).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from crosscoders.errors import ConfigError, DataError
from crosscoders.harvest.config import HarvestConfig
from crosscoders.harvest.text import Document, read_documents

# Why a position is not stored (0 = stored). Earlier reasons win.
KEEP, PAD, SKIP_FIRST, BOS, SPECIAL = 0, 1, 2, 3, 4
REASONS = {PAD: "pad", SKIP_FIRST: "skip_first", BOS: "bos", SPECIAL: "special"}


@dataclass
class ContextBatch:
    """``B`` consecutive contexts, right-padded to the longest (``L``)."""

    input_ids: np.ndarray  # [B, L] int64, padding = pad id
    length: np.ndarray  # [B] real length of each context
    doc: np.ndarray  # [B, L] int64 global document index (-1 for an inserted BOS / padding)
    doc_pos: np.ndarray  # [B, L] int32 position inside the document
    dataset: np.ndarray  # [B, L] int16 index into config.data
    reason: np.ndarray  # [B, L] int8: KEEP or why the position is not stored
    seq_start: int  # global index of the first context

    @property
    def n_contexts(self) -> int:
        return int(self.input_ids.shape[0])


@dataclass
class _Context:
    ids: np.ndarray
    doc: np.ndarray
    doc_pos: np.ndarray
    dataset: np.ndarray


def resolve_bos(config: HarvestConfig, tokenizer: Any) -> str:
    """The BOS policy actually used (``auto`` -> ``context`` if the tokenizer has a BOS)."""
    if config.bos == "auto":
        return "context" if tokenizer.bos_token_id is not None else "none"
    if config.bos != "none" and tokenizer.bos_token_id is None:
        raise ConfigError(
            f"bos={config.bos!r} but the tokenizer has no BOS token; use bos='none' (--bos none)"
        )
    return config.bos


def pick_chat_tokenizer(config: HarvestConfig, tokenizers: Sequence[Any]) -> Any | None:
    """The tokenizer whose chat template formats conversations (chat models usually)."""
    if config.chat_template_from is not None:
        return tokenizers[config.chat_template_from]
    for tok in reversed(tokenizers):  # the chat model is usually listed last
        if getattr(tok, "chat_template", None):
            return tok
    return None


class TokenStream:
    """Deterministic stream of model inputs for one harvest config."""

    def __init__(self, config: HarvestConfig, tokenizer: Any, chat_tokenizer: Any | None = None):
        self.config = config
        self.tokenizer = tokenizer
        self.chat_tokenizer = chat_tokenizer
        self.bos = resolve_bos(config, tokenizer)
        self.bos_id = tokenizer.bos_token_id
        self.eos_id = tokenizer.eos_token_id
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (self.eos_id if self.eos_id is not None else 0)
        excluded = set(tokenizer.all_special_ids) if config.exclude_special else set()
        vocab = tokenizer.get_vocab()
        for token in config.exclude_tokens:
            if token in vocab:
                excluded.add(vocab[token])
            elif token.isdigit() and int(token) < len(vocab):
                excluded.add(int(token))
            else:
                raise ConfigError(
                    f"exclude_tokens: {token!r} is not a token of the tokenizer; spell it as "
                    "the tokenizer does (e.g. <|im_end|>) or drop it"
                )
        self.excluded_ids = np.array(sorted(excluded), dtype=np.int64)

    # -- documents -> token ids ---------------------------------------------------------------
    def _encode(self, docs: list[Document], where: str) -> list[list[int]]:
        texts: list[str] = []
        for doc in docs:
            if doc.text is not None:
                texts.append(doc.text)
                continue
            if self.chat_tokenizer is None:
                raise DataError(
                    f"{where} holds chat messages but no model's tokenizer has a chat template; "
                    "give a chat model (or chat_template_from), or format the data as text"
                )
            try:
                texts.append(self.chat_tokenizer.apply_chat_template(doc.messages, tokenize=False))
            except Exception as err:  # jinja errors: bad roles, alternation, ...
                raise DataError(
                    f"{where}: the chat template rejected a conversation ({err}); check its roles "
                    "and their order, or format the data as text (--format text)"
                ) from err
        encoded = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        out = []
        for doc, ids in zip(docs, encoded, strict=True):
            if doc.messages is not None and ids and ids[0] == self.bos_id:
                ids = ids[1:]  # the template's BOS; BOS placement follows config.bos
            if self.bos == "document":
                ids = [self.bos_id, *ids]
            if (
                self.config.packing == "pack"
                and self.config.eos_between_docs
                and self.eos_id is not None
            ):
                ids = [*ids, self.eos_id]
            out.append(ids)
        return out

    def _dataset_tokens(self, index: int) -> Iterator[list[int]]:
        spec = self.config.data[index]
        block: list[Document] = []
        empty = True
        for doc in read_documents(spec):
            block.append(doc)
            if len(block) == 64:
                for ids in self._encode(block, spec.path):
                    if ids:
                        empty = False
                        yield ids
                block = []
        for ids in self._encode(block, spec.path) if block else []:
            if ids:
                empty = False
                yield ids
        if empty:
            raise DataError(
                f"dataset {spec.path} yielded no documents (empty, or no {spec.text_field!r} / "
                f"{spec.messages_field!r} field with content); check the file and the field names"
            )

    def documents(self) -> Iterator[tuple[int, list[int]]]:
        """(dataset index, token ids) of each document; datasets mixed by token share.

        The next document comes from the dataset furthest below its share of the tokens so
        far; the stream ends when any dataset runs out, so the proportions hold.
        """
        weights = np.array([d.weight for d in self.config.data], dtype=np.float64)
        weights /= weights.sum()
        streams = [self._dataset_tokens(i) for i in range(len(weights))]
        counts = np.zeros(len(weights), dtype=np.int64)
        while True:
            index = int(np.argmax(weights * counts.sum() - counts))
            try:
                ids = next(streams[index])
            except StopIteration:
                return
            counts[index] += len(ids)
            yield index, ids

    # -- token ids -> contexts ---------------------------------------------------------------
    def _contexts(self) -> Iterator[_Context]:
        lead = 1 if self.bos == "context" else 0
        room = self.config.context_length - lead
        parts: list[_Context] = []
        have = 0
        for doc_index, (dataset, ids) in enumerate(self.documents()):
            n = len(ids)
            part = _Context(
                np.asarray(ids, dtype=np.int64),
                np.full(n, doc_index, dtype=np.int64),
                np.arange(n, dtype=np.int32),
                np.full(n, dataset, dtype=np.int16),
            )
            if self.config.packing == "doc":
                yield self._with_lead(_Context(*(a[:room] for a in vars(part).values())), lead)
                continue
            parts.append(part)
            have += n
            while have >= room:
                joined = _Context(
                    *(
                        np.concatenate(a)
                        for a in zip(*(vars(p).values() for p in parts), strict=True)
                    )
                )
                yield self._with_lead(_Context(*(a[:room] for a in vars(joined).values())), lead)
                rest = _Context(*(a[room:] for a in vars(joined).values()))
                parts, have = [rest], len(rest.ids)
        if have:
            joined = _Context(
                *(np.concatenate(a) for a in zip(*(vars(p).values() for p in parts), strict=True))
            )
            yield self._with_lead(joined, lead)

    def _with_lead(self, ctx: _Context, lead: int) -> _Context:
        if not lead:
            return ctx
        return _Context(
            np.concatenate([[self.bos_id], ctx.ids]).astype(np.int64),
            np.concatenate([[-1], ctx.doc]).astype(np.int64),
            np.concatenate([[-1], ctx.doc_pos]).astype(np.int32),
            np.concatenate([ctx.dataset[:1] if ctx.dataset.size else [0], ctx.dataset]).astype(
                np.int16
            ),
        )

    def batches(self, skip_contexts: int = 0) -> Iterator[ContextBatch]:
        """Batches of ``config.batch_size`` contexts, starting at context ``skip_contexts``."""
        size = self.config.batch_size
        if skip_contexts % size:
            raise ValueError(f"can only skip whole batches ({skip_contexts} % {size} != 0)")
        pending: list[_Context] = []
        seq = 0
        for ctx in self._contexts():
            if seq < skip_contexts:
                seq += 1
                continue
            pending.append(ctx)
            if len(pending) == size:
                yield self._batch(pending, seq - size + 1)
                pending = []
            seq += 1
        if pending:
            yield self._batch(pending, seq - len(pending))

    def _batch(self, contexts: list[_Context], seq_start: int) -> ContextBatch:
        b = len(contexts)
        lengths = np.array([c.ids.size for c in contexts], dtype=np.int64)
        width = int(lengths.max())
        ids = np.full((b, width), self.pad_id, dtype=np.int64)
        doc = np.full((b, width), -1, dtype=np.int64)
        doc_pos = np.full((b, width), -1, dtype=np.int32)
        dataset = np.full((b, width), -1, dtype=np.int16)
        for i, c in enumerate(contexts):
            n = c.ids.size
            ids[i, :n], doc[i, :n], doc_pos[i, :n], dataset[i, :n] = (
                c.ids,
                c.doc,
                c.doc_pos,
                c.dataset,
            )
        position = np.arange(width)[None, :]
        reason = np.zeros((b, width), dtype=np.int8)
        # Lowest-priority reason first; later assignments override.
        reason[np.isin(ids, self.excluded_ids)] = SPECIAL
        if self.bos_id is not None:
            reason[ids == self.bos_id] = BOS
        reason[np.broadcast_to(position < self.config.skip_first, reason.shape)] = SKIP_FIRST
        reason[position >= lengths[:, None]] = PAD
        return ContextBatch(ids, lengths, doc, doc_pos, dataset, reason, seq_start)
