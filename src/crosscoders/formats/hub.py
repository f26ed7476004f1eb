"""Checkpoints named by Hugging Face Hub id: ``owner/name`` or ``owner/name/subfolder``."""

from __future__ import annotations

from pathlib import Path

from crosscoders.errors import CrosscodersError


def looks_like_hub_id(text: str) -> bool:
    """``owner/name[/...]`` that is not a local path: a missing file in an existing folder
    (``runs/typo``) is a local mistake, not a download."""
    parts = text.split("/")
    return (len(parts) >= 2 and "" not in parts and not text.startswith((".", "~"))
            and not Path(parts[0]).exists() and "\\" not in text)


def resolve(source: str | Path) -> Path:
    """A local path for ``source``: itself if it exists, else a Hub download of it.

    ``owner/name/sub/folder`` downloads only that folder (Kissane's repo keeps one
    crosscoder per hook point in its own folder). Needs ``huggingface_hub`` (the ``hf``
    extra) and a connection, or a copy already in the Hugging Face cache.
    """
    path = Path(source)
    if path.exists():
        return path
    text = str(source)
    parts = text.split("/")
    if not looks_like_hub_id(text):
        raise CrosscodersError(
            f"nothing at {source}: no such file or directory; check the path (a Hugging Face "
            "Hub id is owner/name[/subfolder])"
        )
    repo_id, subfolder = "/".join(parts[:2]), "/".join(parts[2:])
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CrosscodersError(
            f"{source} is not a local path, and downloading from the Hugging Face Hub needs "
            "huggingface_hub: pip install 'crosscoders[hf]'"
        ) from None
    try:
        local = snapshot_download(repo_id,
                                  allow_patterns=[f"{subfolder}/*"] if subfolder else None)
    except Exception as err:  # noqa: BLE001 - network, auth and not-found errors alike
        raise CrosscodersError(
            f"could not download {repo_id} from the Hugging Face Hub ({type(err).__name__}: "
            f"{err}); check the name and the connection, or download it yourself and pass "
            "the local path"
        ) from None
    target = Path(local) / subfolder if subfolder else Path(local)
    if not target.exists():
        raise CrosscodersError(
            f"{repo_id} has no folder {subfolder!r}; check the folder name in the repository"
        )
    return target
