"""Read documents (plain text or chat conversations) from files and datasets."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crosscoders.errors import ConfigError, DataError
from crosscoders.harvest.config import DataSpec


@dataclass(frozen=True)
class Document:
    """One document: ``text`` (a string) or ``messages`` (chat turns), never both."""

    text: str | None = None
    messages: list[dict[str, Any]] | None = None


def _from_record(record: Any, spec: DataSpec, where: str) -> Document | None:
    if isinstance(record, str):
        return Document(text=record) if spec.format != "chat" else None
    if not isinstance(record, dict):
        raise DataError(
            f"{where}: expected an object with a text or messages field, got {record!r:.80}; "
            "set --text-field / --messages-field to the field that holds the text"
        )
    if spec.format in ("chat", "auto") and spec.messages_field in record:
        messages = record[spec.messages_field]
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise DataError(
                f"{where}: {spec.messages_field!r} must be a list of {{role, content}} objects"
            )
        return Document(messages=messages)
    if spec.format in ("text", "auto") and spec.text_field in record:
        text = record[spec.text_field]
        if text is None:
            return None
        return Document(text=str(text))
    wanted = spec.messages_field if spec.format == "chat" else spec.text_field
    raise DataError(
        f"{where}: no field {wanted!r} (fields: {', '.join(sorted(record))}); set "
        "text_field / messages_field (or --text-field / --messages-field)"
    )


def _txt(path: Path, mode: str) -> Iterator[str]:
    if mode == "file":
        yield path.read_text()
        return
    with open(path, encoding="utf-8") as handle:
        if mode == "line":
            for line in handle:
                if line.strip():
                    yield line.rstrip("\n")
            return
        block: list[str] = []
        for line in handle:
            if line.strip():
                block.append(line)
            elif block:
                yield "".join(block).rstrip("\n")
                block = []
        if block:
            yield "".join(block).rstrip("\n")


def _jsonl(path: Path) -> Iterator[Any]:
    with open(path, encoding="utf-8") as handle:
        first = handle.read(1)
        handle.seek(0)
        if first == "[":  # a JSON array file
            yield from json.load(handle)
            return
        for number, line in enumerate(handle, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(
                        f"{path}:{number}: not valid JSON ({err}); fix or delete that line"
                    ) from None


def _parquet(path: Path, spec: DataSpec) -> Iterator[Any]:
    import pyarrow.parquet as pq

    table = pq.ParquetFile(path)
    names = set(table.schema_arrow.names)
    columns = [c for c in (spec.text_field, spec.messages_field) if c in names] or None
    for batch in table.iter_batches(batch_size=1024, columns=columns):
        yield from batch.to_pylist()


def _hf_dataset(spec: DataSpec) -> Iterator[Any]:
    try:
        import datasets
    except ImportError:
        raise ConfigError(
            f"data {spec.path!r} is a Hugging Face dataset, which needs the datasets package: "
            "pip install 'crosscoders[hf]'"
        ) from None
    path = Path(spec.path).expanduser()
    try:
        if path.is_dir() and (
            (path / "dataset_info.json").exists()
            or (path / "state.json").exists()
            or (path / "dataset_dict.json").exists()
        ):
            data = datasets.load_from_disk(str(path))
            if isinstance(data, datasets.DatasetDict):
                data = data[spec.split]
        else:
            data = datasets.load_dataset(spec.path, spec.subset, split=spec.split)
    except (FileNotFoundError, ValueError, KeyError, ConnectionError, OSError) as err:
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise ConfigError(
            f"cannot load dataset {spec.path!r} (split {spec.split!r}): not a local file or "
            f"dataset directory, nor a Hugging Face dataset available here ({first})"
        ) from err
    yield from data


def read_documents(spec: DataSpec) -> Iterator[Document]:
    """Documents of one data source, in file order (deterministic)."""
    path = Path(spec.path).expanduser()
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".txt":
            records: Iterator[Any] = _txt(path, spec.txt_split)
        elif suffix in (".jsonl", ".json", ".ndjson"):
            records = _jsonl(path)
        elif suffix == ".parquet":
            records = _parquet(path, spec)
        else:
            raise ConfigError(
                f"data file {spec.path}: unknown type {suffix!r}; "
                "use .txt, .jsonl, .json or .parquet"
            )
    elif (
        path.suffix.lower() in (".txt", ".jsonl", ".json", ".parquet")
        or spec.path.startswith((".", "/", "~"))
        and not path.exists()
    ):
        raise ConfigError(f"data file {spec.path} does not exist; check the path")
    else:
        records = _hf_dataset(spec)
    count = 0
    for number, record in enumerate(records):
        if spec.max_docs is not None and count >= spec.max_docs:
            return
        doc = _from_record(record, spec, f"{spec.path} record {number}")
        if doc is not None:
            count += 1
            yield doc
