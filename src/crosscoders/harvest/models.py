"""Load causal LMs and their tokenizers, find their decoder blocks, fingerprint them."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from crosscoders.errors import ConfigError, CrosscodersError
from crosscoders.harvest.config import ModelSpec

# Where the decoder blocks live in common architectures; anything else is found by search.
BLOCK_PATHS = (
    "model.layers",  # Llama, Mistral, Qwen2, Gemma 1-3 text, Phi, ...
    "model.language_model.layers",  # Gemma 3 multimodal and other VLM wrappers
    "model.decoder.layers",  # OPT
    "transformer.h",  # GPT-2, GPT-J, Falcon
    "gpt_neox.layers",  # GPT-NeoX, Pythia
    "transformer.blocks",  # MPT
    "transformer.layers",
    "model.transformer.h",
)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Location:
    """Where the weights come from: ``from_pretrained`` arguments."""

    source: str  # directory, hub id, or the directory holding a GGUF file
    gguf_file: str | None
    is_local: bool


def locate(spec: ModelSpec) -> Location:
    """Split a model path into the ``from_pretrained`` argument and a GGUF file name."""
    path = spec.path
    if path.endswith(".gguf"):
        file = Path(path).expanduser()
        if not file.is_file():
            raise ConfigError(f"model file {path} does not exist; check the path")
        return Location(str(file.parent), file.name, True)
    local = Path(path).expanduser()
    if local.exists():
        if not local.is_dir():
            raise ConfigError(
                f"model path {path} is a file but not a .gguf; give a model directory"
            )
        return Location(str(local), spec.gguf_file, True)
    looks_local = path.startswith((".", "/", "~")) or path.count("/") > 1 or os.sep != "/"
    if looks_local:
        raise ConfigError(f"model path {path} does not exist; check the path or give a hub id")
    return Location(path, spec.gguf_file, False)


def _pretrained_kwargs(spec: ModelSpec, where: Location) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"trust_remote_code": spec.trust_remote_code}
    if spec.revision:
        kwargs["revision"] = spec.revision
    if where.gguf_file:
        kwargs["gguf_file"] = where.gguf_file
        try:
            import gguf  # noqa: F401
        except ImportError:
            raise ConfigError(
                f"model {spec.path} is a GGUF file, which needs the gguf package: "
                "pip install 'crosscoders[gguf]'"
            ) from None
    return kwargs


def _load_error(spec: ModelSpec, what: str, err: Exception) -> CrosscodersError:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return ConfigError(
        f"cannot load the {what} of model {spec.path!r}: not a model directory, GGUF file, or "
        f"Hugging Face hub id available here (online or in the local cache) ({first[:200]})"
    )


def load_config(spec: ModelSpec) -> Any:
    """The model's (text) config, without loading weights."""
    from transformers import AutoConfig

    where = locate(spec)
    try:
        config = AutoConfig.from_pretrained(where.source, **_pretrained_kwargs(spec, where))
    except (OSError, ValueError, KeyError) as err:
        raise _load_error(spec, "config", err) from err
    return config


def text_config(config: Any) -> Any:
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def n_layers_and_d_model(config: Any) -> tuple[int, int]:
    text = text_config(config)
    return int(text.num_hidden_layers), int(text.hidden_size)


def load_tokenizer(spec: ModelSpec) -> Any:
    from transformers import AutoTokenizer

    where = locate(spec)
    try:
        return AutoTokenizer.from_pretrained(where.source, **_pretrained_kwargs(spec, where))
    except (OSError, ValueError, KeyError) as err:
        raise _load_error(spec, "tokenizer", err) from err


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={device!r} but CUDA is not available here; use --device cpu")
    return torch.device(device)


def load_model(spec: ModelSpec, dtype: str, device: str) -> nn.Module:
    """``AutoModelForCausalLM`` in eval mode on ``device`` with weights in ``dtype``."""
    from transformers import AutoModelForCausalLM

    where = locate(spec)
    kwargs = _pretrained_kwargs(spec, where)
    try:
        model = AutoModelForCausalLM.from_pretrained(where.source, dtype=_DTYPES[dtype], **kwargs)
    except (OSError, ValueError, KeyError) as err:
        raise _load_error(spec, "weights", err) from err
    return model.to(resolve_device(device)).eval()


def attribute_path(obj: Any, path: str) -> Any:
    """``obj.a.b.c`` for ``path="a.b.c"``, or None where an attribute is missing."""
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder blocks of a causal LM (``ModuleList``) and their attribute path."""
    config = getattr(model, "config", None)
    n_layers = n_layers_and_d_model(config)[0] if config is not None else None
    for path in BLOCK_PATHS:
        module = attribute_path(model, path)
        if isinstance(module, nn.ModuleList) and (n_layers is None or len(module) == n_layers):
            return path, module
    # Fallback: the first ModuleList of identical modules with one entry per layer.
    for name, module in model.named_modules():
        if (
            isinstance(module, nn.ModuleList)
            and len(module) > 0
            and (n_layers is None or len(module) == n_layers)
            and len({type(m) for m in module}) == 1
        ):
            return name, module
    raise CrosscodersError(
        f"cannot find the decoder blocks of {type(model).__name__}: no ModuleList with "
        f"{n_layers} identical blocks; please report this architecture"
    )


def _sha256(path: Path, head_tail: int | None = None) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        if head_tail is None:
            while chunk := handle.read(1 << 22):
                digest.update(chunk)
        else:
            size = path.stat().st_size
            digest.update(str(size).encode())
            digest.update(handle.read(head_tail))
            if size > head_tail:
                handle.seek(max(head_tail, size - head_tail))
                digest.update(handle.read(head_tail))
    return digest.hexdigest()


def fingerprint(spec: ModelSpec, config: Any) -> dict[str, Any]:
    """What identifies the weights: the hub revision, a GGUF file's sha256, or for a local
    directory a hash of its config and of the size, head and tail of each weight file."""
    where = locate(spec)
    out: dict[str, Any] = {"path": spec.path, "revision": spec.revision}
    commit = getattr(config, "_commit_hash", None)
    if commit:
        out["commit"] = commit
    if where.gguf_file and where.is_local:
        out["file_sha256"] = _sha256(Path(where.source) / where.gguf_file)
    elif where.is_local:
        digest = hashlib.sha256()
        root = Path(where.source)
        for file in sorted(root.iterdir()):
            if file.name == "config.json":
                digest.update(file.read_bytes())
            elif file.suffix in (".safetensors", ".bin", ".pt", ".gguf"):
                digest.update(file.name.encode())
                digest.update(_sha256(file, head_tail=1 << 20).encode())
        out["fingerprint"] = digest.hexdigest()
    return out


def compare_tokenizers(a: Any, b: Any, name_a: str, name_b: str) -> None:
    """Raise if two tokenizers map any token to different ids or differ in special tokens."""
    va, vb = a.get_vocab(), b.get_vocab()
    diffs = [
        f"{tok!r}: {va.get(tok)} vs {vb.get(tok)}"
        for tok in sorted(set(va) | set(vb))
        if va.get(tok) != vb.get(tok)
    ]
    for attr in ("bos_token", "eos_token", "unk_token"):
        ta, tb = getattr(a, attr, None), getattr(b, attr, None)
        if ta != tb:
            diffs.append(f"{attr}: {ta!r} vs {tb!r}")
    sa, sb = set(a.all_special_tokens), set(b.all_special_tokens)
    if sa != sb:
        only = sorted(sa ^ sb)
        diffs.append(f"special tokens only in one: {', '.join(map(repr, only[:5]))}")
    if diffs:
        shown = "; ".join(diffs[:5]) + (f"; ... ({len(diffs)} in all)" if len(diffs) > 5 else "")
        raise ConfigError(
            f"tokenizers of {name_a} and {name_b} differ ({name_a} vs {name_b}): {shown}; "
            "both models must read the same token ids: pair models that share a tokenizer"
        )
