"""Export a crosscoder to another codebase's format: the inverse of the importers.

    notes = export_crosscoder(model, "dictionary_learning", "exported/")

Each format module checks first that its format can express the model exactly (refusing
with the reason) and then writes its files; nothing is written to ``out`` before that, and
``out`` must be new or empty. The returned notes name what the other codebase keeps only
as weights: the forward pass is exact, but a training-time constraint (tied or
single-source decoders, weakly causal masks) is not kept if you train it further there.
"""

from __future__ import annotations

from pathlib import Path

from crosscoders.errors import CrosscodersError
from crosscoders.formats import crosscode, dictionary_learning
from crosscoders.io import check_dir_path, ensure_dir
from crosscoders.model import Crosscoder

EXPORTERS = {"dictionary_learning": dictionary_learning, "crosscode": crosscode}


def export_crosscoder(model: Crosscoder, format: str, out: str | Path) -> list[str]:
    """Write ``model`` to the new or empty directory ``out`` in ``format``; returns notes."""
    if format not in EXPORTERS:
        raise CrosscodersError(
            f"unknown export format {format!r}; choose one of {', '.join(EXPORTERS)}")
    module = EXPORTERS[format]
    module.check_export(model)
    out = check_output(out)
    notes = export_notes(model, format)
    module.export(model, ensure_dir(out, "--out"))
    return notes


def check_output(out: str | Path) -> Path:
    """``out`` as a path that is new or an empty directory (an export never overwrites)."""
    out = check_dir_path(out, "--out")
    if out.is_dir():
        found = sorted(p.name for p in out.iterdir())
        if found:
            raise CrosscodersError(
                f"--out {out} is not empty (holds {', '.join(found[:5])}"
                f"{', ...' if len(found) > 5 else ''}); choose a new directory or empty it "
                "(an export never overwrites files)")
    return out


def export_notes(model: Crosscoder, format: str) -> list[str]:
    """What the exported checkpoint holds only as weights (its forward pass is exact)."""
    c, notes = model.config, []
    if model.has_designated_latents:
        notes.append(
            f"the {c.n_shared_latents} shared and {sum(c.n_exclusive_latents or [])} "
            "exclusive designated latents are written as their tied / single-source "
            f"weights; {format} does not keep that structure if you train the model further")
    if c.causality == "weakly_causal":
        notes.append(
            "the weakly causal masks are written as zero weights; "
            f"{format} does not keep them if you train the model further")
    if format == "crosscode" and c.dec_norm == "concat":
        notes.append("dec_norm=concat only weighted the sparsity penalty and has no place "
                     "in crosscode's config; it is not recorded")
    return notes


__all__ = ["EXPORTERS", "check_output", "export_crosscoder", "export_notes"]
