"""Configuration of a harvest: which models and sites, which text, how to tokenise and store."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from crosscoders.configs import Config
from crosscoders.errors import ConfigError
from crosscoders.store.format import STORE_DTYPES

# Fields that change how a harvest runs but not what it stores (a store can be resumed with
# other values).
OPERATIONAL_FIELDS = ("sequential",)


@dataclasses.dataclass
class ModelSpec(Config):
    """One model and the sites read from it; each (model, site) pair is one source.

    ``path``: a Hugging Face model id, a local directory, or a ``.gguf`` file.
    ``sites``: ``"resid_out:L"`` (output of block L, the default kind), ``"resid_in:L"``
    (input of block L); ``L`` is an index (negative counts from the end) or a fraction of
    depth in ``[0, 1]`` written with a dot (``0.5`` = middle block).
    """

    path: str
    sites: list[str] = dataclasses.field(default_factory=lambda: ["resid_out:0.5"])
    name: str = ""
    revision: str | None = None
    gguf_file: str | None = None
    trust_remote_code: bool = False

    def validate(self) -> None:
        if not self.path:
            raise ConfigError(
                "models[].path: empty; give a hub id, a local directory or a .gguf file"
            )
        if not self.sites:
            raise ConfigError(f"models[{self.path}].sites: empty; give at least one site, e.g. 0.5")
        if len(set(self.sites)) != len(self.sites):
            raise ConfigError(
                f"models[{self.path}].sites: {self.sites} has duplicates; list each site once"
            )


@dataclasses.dataclass
class DataSpec(Config):
    """One text source: a local ``.txt``/``.jsonl``/``.json``/``.parquet`` file, a saved
    ``datasets`` directory, or a Hugging Face dataset name (local or cached).

    ``format``: ``"text"`` reads ``text_field``; ``"chat"`` reads a list of messages
    (``messages_field``) and formats it with the chat template; ``"auto"`` picks per record.
    ``weight``: share of the tokens in a mixture (normalised over the data list).
    ``txt_split``: for ``.txt`` files, one document per ``"line"``, per blank-line separated
    ``"paragraph"``, or the whole ``"file"``.
    """

    path: str
    weight: float = 1.0
    format: Literal["auto", "text", "chat"] = "auto"
    text_field: str = "text"
    messages_field: str = "messages"
    split: str = "train"
    subset: str | None = None
    txt_split: Literal["line", "paragraph", "file"] = "line"
    max_docs: int | None = None

    def validate(self) -> None:
        if not self.path:
            raise ConfigError("data[].path: empty; give a file, directory or dataset name")
        if not self.weight > 0:
            raise ConfigError(f"data[{self.path}].weight must be > 0, got {self.weight}")


@dataclasses.dataclass
class HarvestConfig(Config):
    """Everything that decides the content of an activation store.

    Token handling: ``packing="pack"`` concatenates documents (each followed by EOS when
    ``eos_between_docs``) into contexts of exactly ``context_length`` tokens; ``"doc"`` puts
    one document per context (truncated, right-padded). ``bos``: ``"context"`` puts one BOS
    at the start of every context, ``"document"`` before every document, ``"none"`` never;
    ``"auto"`` is ``"context"`` if the tokenizer has a BOS token, else ``"none"``.
    Rows excluded from the store (they still serve as context): BOS, padding, all special
    tokens when ``exclude_special``, the tokens in ``exclude_tokens``, and the first
    ``skip_first`` positions of each context.
    ``eval_tokens``: held-out split (the last tokens of the store), a count (>= 1) or a
    fraction (< 1); can be overridden when the store is opened.
    """

    models: list[ModelSpec]
    data: list[DataSpec]
    tokens: int = 1_000_000
    context_length: int = 1024
    packing: Literal["pack", "doc"] = "pack"
    bos: Literal["auto", "context", "document", "none"] = "auto"
    eos_between_docs: bool = True
    exclude_special: bool = True
    exclude_tokens: list[str] = dataclasses.field(default_factory=list)
    skip_first: int = 0
    chat_template_from: int | None = None
    batch_size: int = 8
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "auto"
    store_dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    shard_tokens: int = 1 << 18
    eval_tokens: int | float = 0.01
    sequential: bool = False

    def validate(self) -> None:
        if not self.models:
            raise ConfigError("models: empty; give at least one model (e.g. --base and --chat)")
        if not self.data:
            raise ConfigError("data: empty; give at least one text source with --data")
        names = self.model_names()
        if len(set(names)) != len(names):
            raise ConfigError(f"models: names {names} are not unique; set models[].name")
        if self.tokens <= 0:
            raise ConfigError(f"tokens must be positive, got {self.tokens}")
        if self.context_length < 2:
            raise ConfigError(f"context_length must be >= 2, got {self.context_length}")
        if self.batch_size <= 0:
            raise ConfigError(f"batch_size must be positive, got {self.batch_size}")
        if self.shard_tokens <= 0:
            raise ConfigError(f"shard_tokens must be positive, got {self.shard_tokens}")
        if not 0 <= self.skip_first < self.context_length:
            raise ConfigError(f"skip_first must be in [0, context_length), got {self.skip_first}")
        if self.eval_tokens < 0 or (self.eval_tokens >= 1 and self.eval_tokens >= self.tokens):
            raise ConfigError(
                f"eval_tokens={self.eval_tokens} must be a fraction < 1 or a count < tokens"
            )
        if self.chat_template_from is not None and not 0 <= self.chat_template_from < len(
            self.models
        ):
            raise ConfigError(
                f"chat_template_from={self.chat_template_from} is not a model index "
                f"(0..{len(self.models) - 1})"
            )
        if self.store_dtype not in STORE_DTYPES:  # pragma: no cover - Literal already checks
            raise ConfigError(f"store_dtype must be one of {STORE_DTYPES}")

    def model_names(self) -> list[str]:
        """Model labels: ``name`` if given, else the file or directory name."""
        out = []
        for i, spec in enumerate(self.models):
            if spec.name:
                out.append(spec.name)
            else:
                stem = spec.path.rstrip("/").split("/")[-1].removesuffix(".gguf")
                out.append(stem or f"model{i}")
        return out

    def identity(self) -> dict[str, Any]:
        """The config fields that decide the store's content (compared on resume)."""
        data = self.to_dict()
        for name in OPERATIONAL_FIELDS:
            data.pop(name)
        return data
