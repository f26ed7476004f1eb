"""Import crosscoders saved by other codebases, so their published models can be analysed.

    model = import_crosscoder("path/to/checkpoint")           # format detected
    model = import_crosscoder("owner/repo")                    # a Hugging Face Hub repo
    model = import_crosscoder("cc_weights.pt", scale=[0.276, 0.244])
    model.save("my_crosscoder")                                  # then crosscoders diff ...

Supported (details and caveats in docs/formats.md):

* ``dictionary_learning``: the crosscoder forks of saprmarks/dictionary_learning
  (science-of-finetuning/crosscoder_learning; Minder et al.'s models): ``CrossCoder`` and
  ``BatchTopKCrossCoder``, from a hub directory (``config.json`` + ``model.safetensors``) or
  a state-dict file (``.pt`` / ``.safetensors``), including their activation normaliser;
* ``kissane``: ckkissane/crosscoder-model-diff-replication (``cfg.json`` + ``cc_weights.pt``),
  whose normalisation factors are not stored: pass them as ``scale`` (or ``scale_from``);
* ``crosscode``: oli-clive-griffin's ``crosscode`` (``model_cfg.yaml`` + ``model.pt``), ReLU
  and JumpReLU crosscoders over any number of models x hookpoints.

Every importer returns a :class:`~crosscoders.Crosscoder` that works on raw activations, with
any normalisation folded in and recorded, and ``metadata["imported_from"]`` saying where it
came from. :func:`export_crosscoder` writes one back out in the ``dictionary_learning`` or
``crosscode`` format (refusing what a format cannot express exactly).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from crosscoders.errors import CrosscodersError
from crosscoders.formats import crosscode, dictionary_learning, kissane
from crosscoders.formats.hub import resolve
from crosscoders.model import Crosscoder

FORMATS = {
    "dictionary_learning": dictionary_learning,
    "kissane": kissane,
    "crosscode": crosscode,
}


def detect_format(path: str | Path) -> str:
    """Name of the format at ``path`` (a file or directory), or a clear error."""
    path = Path(path)
    if not path.exists():
        raise CrosscodersError(
            f"nothing to import at {path}: no such file or directory; check the path, or give a "
            "Hugging Face Hub id (owner/name[/subfolder])"
        )
    if path.is_dir() and (path / "config.json").exists():
        import json

        try:
            if json.loads((path / "config.json").read_text()).get("format") == "crosscoders":
                return "crosscoders"
        except (ValueError, AttributeError):
            pass
    for name, module in FORMATS.items():
        if module.matches(path):
            return name
    listing = sorted(p.name for p in path.iterdir()) if path.is_dir() else [path.name]
    raise CrosscodersError(
        f"{path} is not a crosscoder format this version can import (found: "
        f"{', '.join(listing[:12]) or 'an empty directory'}); supported: "
        f"{', '.join(FORMATS)} (see docs/formats.md), or pass format= explicitly"
    )


def import_crosscoder(path: str | Path, format: str = "auto", **options: Any) -> Crosscoder:
    """Load a crosscoder saved by another codebase (or by this one) as a :class:`Crosscoder`.

    ``path`` is a file or directory, or a Hugging Face Hub id (``owner/name`` or
    ``owner/name/subfolder``), downloaded when no such local path exists.

    ``options`` go to the format's importer: ``scale`` / ``scale_from`` (kissane),
    ``source_names`` (all).
    """
    path = resolve(path)
    name = detect_format(path) if format == "auto" else format
    if name == "crosscoders":
        return Crosscoder.load(path)
    if name not in FORMATS:
        raise CrosscodersError(
            f"unknown format {name!r}; choose auto or one of {', '.join(FORMATS)}")
    return FORMATS[name].load(Path(path), **options)


from crosscoders.formats.export import export_crosscoder  # noqa: E402 - needs the formats

__all__ = ["FORMATS", "detect_format", "export_crosscoder", "import_crosscoder"]
