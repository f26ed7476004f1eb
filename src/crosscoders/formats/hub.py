"""The Hugging Face Hub: checkpoints named ``owner/name[/subfolder]``, downloaded or pushed.

Downloads go through ``huggingface_hub.snapshot_download``; a push stages the crosscoder
directory, its model card and (optionally) a diff beside it in a temporary folder and sends
it as one commit with ``HfApi.create_repo`` + ``HfApi.upload_folder``. The Hub's HTTP
errors (401 token, 403 not yours, 404 no such owner or repo) become one-line
:class:`CrosscodersError` messages that say what to do.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from crosscoders.diff.schema import TABLE_FILES, Files
from crosscoders.errors import CrosscodersError
from crosscoders.io import brief

if TYPE_CHECKING:
    from crosscoders.model import Crosscoder

#: the files of our own format that :func:`resolve` fetches for ``from_pretrained``
CROSSCODER_FILES = ("config.json", "model.safetensors")
LOGIN = "log in with `hf auth login` (or set HF_TOKEN)"


def looks_like_hub_id(text: str) -> bool:
    """``owner/name[/...]`` that is not a local path: a missing file in an existing folder
    (``runs/typo``) is a local mistake, not a download."""
    parts = text.split("/")
    return (len(parts) >= 2 and "" not in parts and not text.startswith((".", "~"))
            and not Path(parts[0]).exists() and "\\" not in text)


def split_hub_id(text: str) -> tuple[str, str]:
    """``owner/name/sub/folder`` -> (``owner/name``, ``sub/folder``); checks the repo name."""
    parts = str(text).strip("/").split("/")
    if len(parts) < 2 or "" in parts:
        raise CrosscodersError(
            f"{text!r} is not a Hugging Face Hub id; write it as owner/name or "
            "owner/name/subfolder (owner: your user name or an organisation)"
        )
    repo_id = "/".join(parts[:2])
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except ValueError as err:  # HFValidationError
        raise CrosscodersError(
            f"{repo_id!r} is not a valid Hub repo id ({brief(err, 120)}); use letters, digits, "
            "'-', '_' and '.' in owner/name"
        ) from None
    return repo_id, "/".join(parts[2:])


def resolve(source: str | Path, *, files: tuple[str, ...] | None = None,
            revision: str | None = None, token: str | None = None) -> Path:
    """A local path for ``source``: itself if it exists, else a Hub download of it.

    ``owner/name/sub/folder`` downloads only that folder (Kissane's repo keeps one
    crosscoder per hook point in its own folder); ``files`` narrows it to those file names.
    Needs ``huggingface_hub`` (the ``hf`` extra) and a connection, or a copy already in the
    Hugging Face cache.
    """
    path = Path(source)
    if path.exists():
        return path
    text = str(source)
    if not looks_like_hub_id(text):
        raise CrosscodersError(
            f"nothing at {source}: no such file or directory; check the path (a Hugging Face "
            "Hub id is owner/name[/subfolder])"
        )
    repo_id, subfolder = split_hub_id(text)
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CrosscodersError(
            f"{source} is not a local path, and downloading from the Hugging Face Hub needs "
            "huggingface_hub: pip install 'crosscoders[hf]'"
        ) from None
    prefix = f"{subfolder}/" if subfolder else ""
    patterns = ([prefix + name for name in files] if files
                else [f"{subfolder}/*"] if subfolder else None)
    options = {k: v for k, v in (("revision", revision), ("token", token)) if v is not None}
    try:
        local = snapshot_download(repo_id, allow_patterns=patterns, **options)
    except Exception as err:  # noqa: BLE001 - network, auth and not-found errors alike
        raise hub_error(err, repo_id, "download", revision=revision) from None
    target = Path(local) / subfolder if subfolder else Path(local)
    if not target.exists():
        raise CrosscodersError(
            f"{repo_id} has no folder {subfolder!r}; check the folder name in the repository"
        )
    return target


def hub_error(err: BaseException, repo_id: str, action: str, user: str | None = None,
              revision: str | None = None) -> CrosscodersError:
    """One line for a failed Hub call: what the status code means and what to do."""
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalTokenNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(err, CrosscodersError):
        return err
    status = getattr(getattr(err, "response", None), "status_code", None)
    owner = repo_id.split("/")[0]
    yours = f"{user}/{repo_id.split('/')[-1]}" if user else "your-name/" + repo_id.split("/")[-1]
    if isinstance(err, LocalTokenNotFoundError):
        return CrosscodersError(
            f"no Hugging Face token found (needed to {action} {repo_id}); {LOGIN} using a token "
            "that has write access, then run the same command again")
    if isinstance(err, GatedRepoError):
        return CrosscodersError(
            f"{repo_id} is gated: accept its terms on https://huggingface.co/{repo_id} with "
            f"your account, then {LOGIN}")
    if isinstance(err, RevisionNotFoundError):
        return CrosscodersError(
            f"{repo_id} has no revision {revision!r}; check the branch, tag or commit name")
    if status == 401:
        return CrosscodersError(
            f"the Hugging Face Hub rejected your token (401 Unauthorized: missing, invalid or "
            f"expired) when trying to {action} {repo_id}; {LOGIN} using a valid token")
    if status == 403 and action == "download":
        return CrosscodersError(
            f"you may not download {repo_id} (403 Forbidden): your token has no access to it; "
            f"request access on https://huggingface.co/{repo_id}, or {LOGIN} as a user who "
            "has it")
    if status == 403:
        return CrosscodersError(
            f"you may not {action} {repo_id} (403 Forbidden): it belongs to {owner}, which is "
            f"not you or an organisation your token can write to; push to {yours}, or use a "
            "token with write access to it")
    if status == 404:
        if action == "download":
            return CrosscodersError(
                f"{repo_id} was not found on the Hugging Face Hub (404), or it is private and "
                f"your token cannot read it; check the name, or {LOGIN}")
        return CrosscodersError(
            f"cannot {action} {repo_id} (404 Not Found): no user or organisation {owner!r} "
            f"that you belong to; push to {yours}")
    if status is not None:
        return CrosscodersError(
            f"the Hugging Face Hub refused to {action} {repo_id} ({status}: "
            f"{brief(err, 160)}); check the repo id and your token, then run the same "
            "command again")
    return CrosscodersError(
        f"could not {action} {repo_id} on the Hugging Face Hub ({brief(err, 160)}); check the "
        "name and the connection (or HF_ENDPOINT), or work with a local path")


# ------------------------------------------------------------------------------- push


def push_to_hub(model: Crosscoder, repo_id: str, *, run_dir: str | Path | None = None,
                diff_dir: str | Path | None = None, report: str | Path | None = None,
                private: bool | None = None, token: str | None = None,
                commit_message: str | None = None, api: Any = None) -> str:
    """Upload ``model`` with a generated model card to ``owner/name[/subfolder]``.

    ``run_dir`` (its training run) adds ``metrics.jsonl`` and the held-out metrics to the
    card; ``diff_dir`` (a ``crosscoders diff`` output) uploads its table and summaries under
    ``diff/`` with the category counts in the card, and ``report`` (default: a
    ``report.html`` in or beside ``diff_dir``) goes there too. ``api``: an
    ``huggingface_hub.HfApi`` (or a stand-in with ``whoami``, ``create_repo`` and
    ``upload_folder``). Returns the URL of the uploaded folder.
    """
    from crosscoders.formats.card import model_card

    repo, subfolder = split_hub_id(repo_id)
    diff_files = _diff_files(diff_dir, report)  # every local check before the network
    metrics = Path(run_dir) / "metrics.jsonl" if run_dir is not None else None
    card = model_card(model, repo_id, run_dir=run_dir, diff_dir=diff_dir,
                      has_report="diff/report.html" in diff_files)
    if api is None:
        from huggingface_hub import HfApi

        from crosscoders import __version__

        api = HfApi(token=token, library_name="crosscoders", library_version=__version__)
    user = _check_write_access(api, repo)
    with tempfile.TemporaryDirectory(prefix="crosscoders-push-") as tmp:
        stage = Path(tmp)
        model.save(stage)
        if metrics is not None and metrics.is_file():
            shutil.copyfile(metrics, stage / metrics.name)
        for name, source in diff_files.items():
            (stage / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, stage / name)
        card.save(stage / "README.md")
        try:
            api.create_repo(repo, private=private, exist_ok=True)
            api.upload_folder(repo_id=repo, folder_path=str(stage),
                              path_in_repo=subfolder or None,
                              commit_message=commit_message or "Upload crosscoder")
        except Exception as err:  # noqa: BLE001 - mapped to one line naming the fix
            raise hub_error(err, repo, "push to", user=user) from None
    endpoint = str(getattr(api, "endpoint", None) or "https://huggingface.co").rstrip("/")
    return f"{endpoint}/{repo}" + (f"/tree/main/{subfolder}" if subfolder else "")


def _check_write_access(api: Any, repo: str) -> str:
    """The token's user name, after refusing a missing, expired or read-only token and an
    owner that is neither the user nor one of their organisations."""
    try:
        who = api.whoami()
    except Exception as err:  # noqa: BLE001
        raise hub_error(err, repo, "push to") from None
    user = str(who.get("name", ""))
    role = ((who.get("auth") or {}).get("accessToken") or {}).get("role")
    if role == "read":
        raise CrosscodersError(
            f"your Hugging Face token (user {user}) is read-only; create a token with write "
            "access at https://huggingface.co/settings/tokens and log in with it (`hf auth "
            "login`, or set HF_TOKEN)")
    owner = repo.split("/")[0]
    namespaces = {user, *(str(o.get("name")) for o in who.get("orgs") or [])}
    if owner not in namespaces:
        raise CrosscodersError(
            f"{repo} is not yours: your token is for {user}"
            + (f" (organisations: {', '.join(sorted(namespaces - {user}))})"
               if len(namespaces) > 1 else "")
            + f"; push to {user}/{repo.split('/')[1]} or an organisation you belong to")
    return user


def _diff_files(diff_dir: str | Path | None, report: str | Path | None) -> dict[str, Path]:
    """Files to upload beside the crosscoder: repo path -> local path."""
    if diff_dir is None:
        if report is not None:
            raise CrosscodersError("--report goes with --diff DIFF_DIR; give both, or neither")
        return {}
    diff = Path(diff_dir)
    missing = [name for name in TABLE_FILES if not (diff / name).is_file()]
    if missing:
        raise CrosscodersError(
            f"{diff} is not a `crosscoders diff` output (missing {', '.join(missing)}); give "
            "the directory that `crosscoders diff --out` wrote")
    files = {f"diff/{name}": diff / name for name in TABLE_FILES}
    files.update({f"diff/{p.name}": p for p in sorted(diff.glob("*.json"))})
    if report is not None:
        report = Path(report)
        if not report.is_file():
            raise CrosscodersError(f"no report at {report}; check the path (crosscoders report "
                                   "writes DIFF_DIR/report.html by default)")
    else:  # `crosscoders report` writes DIFF_DIR/report.html; `crosscoders run` ../report/
        found = [p for p in (diff / Files.REPORT, diff.parent / "report" / Files.REPORT)
                 if p.is_file()]
        report = found[0] if found else None
    if report is not None:
        files[f"diff/{Files.REPORT}"] = report
    return files
