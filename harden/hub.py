"""Releasing an export to the Hugging Face Hub (`harden push`).

Why one commit through `create_commit` rather than `upload_folder`: with `hf_xet` installed (the default for
huggingface_hub 2.x), `upload_folder` streams the folder through a pipeline that may split it into several commits
and, after a failed commit of more than 20 files, retries in smaller commits, so a failure could publish half an
export. `create_commit` sends the whole export, and the deletion of remote files the export does not have, in one
atomic commit: the repository holds either the previous release or the new one. Large files are still uploaded
through LFS/Xet before that commit, as huggingface_hub decides with the server.

Tokens come only from huggingface_hub's standard sources (`HF_TOKEN`, `hf auth login`) or the `token` argument; they
are never printed, logged or written. `HF_ENDPOINT` is read when pushing (not only when huggingface_hub is imported),
so private Hub deployments work from the library too.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from . import __version__
from .errors import BadInputError, GateFailedError, HardenError, HubError
from .checkpoint import LAYOUTS, load_hardened  # noqa: F401  (load_hardened: its old import path, for one release)
from .files import sha256_file
from .scrub import register_secret, scrub

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_LOGIN_HINT = "run `hf auth login` or set HF_TOKEN to a token with write access"
_SKIPPED_DIRS = (".git", ".cache")  # never part of a release (`.cache/huggingface` is hf download's metadata)


def find_export(path: Path, layout: str | None = None) -> Path:
    """The export folder to push: PATH itself if it is one, else RUN_DIR/export/<layout> (compact when both exist)."""
    path = Path(path)
    if layout is not None and layout not in LAYOUTS:
        raise BadInputError(f"unknown layout {layout!r}", f"use one of {', '.join(LAYOUTS)}")
    if (path / "model_index.json").is_file() and (path / "harden" / "report.json").is_file():
        found = _read_report(path).get("layout")
        if layout is not None and found is not None and found != layout:
            raise BadInputError(f"{path} is the {found} export, not {layout}", f"drop --layout or pass the {layout} "
                                "export folder")
        return path
    exports = path / "export"
    available = [name for name in LAYOUTS if (exports / name / "model_index.json").is_file()]
    if not available:
        raise BadInputError(f"{path} is neither a harden run folder with an export nor an export folder",
                            "pass the RUN_DIR of `harden run` or its export/<layout> folder")
    if layout is None:
        layout = "compact" if "compact" in available else available[0]
    elif layout not in available:
        raise BadInputError(f"{path} has no {layout} export (found: {', '.join(available)})",
                            f"use --layout {available[0]}")
    return exports / layout


def _read_report(folder: Path) -> dict:
    path = folder / "harden" / "report.json"
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise BadInputError(f"cannot read {path}: {err}", "export the run again") from None
    if not isinstance(report, dict):
        raise BadInputError(f"{path} is not a JSON object", "export the run again")
    return report


def _local_files(folder: Path) -> list[str]:
    """Relative posix paths of every file to publish, sorted."""
    files = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if path.is_file() and rel.parts[0] not in _SKIPPED_DIRS:
            files.append(rel.as_posix())
    return files


def check_export(folder: Path) -> dict:
    """Refuse what must not be released: a run whose gates failed, an export without card, or altered files."""
    report = _read_report(folder)
    if not (folder / "README.md").is_file():
        raise BadInputError(f"{folder} has no README.md model card", "export the run again; harden writes the card")
    if report.get("passed") is not True:
        failed = [g.get("name", "?") for g in report.get("gates") or [] if not g.get("passed")]
        raise GateFailedError(f"refusing to push: the run did not pass its gates ({', '.join(failed) or 'no gates'})",
                              "a model that failed verification must not be released; fix the recipe and rerun")
    expected = report.get("files")
    if isinstance(expected, dict):  # written by the export; every published file except README.md and report.json
        present = set(_local_files(folder)) - {"README.md", "harden/report.json"}
        changed = sorted(p for p in expected if p not in present or sha256_file(folder / p) != expected[p])
        extra = sorted(present - set(expected))
        if changed or extra:
            what = f"{changed[0]} differs from report.json" if changed else f"{extra[0]} is not in report.json"
            raise BadInputError(f"the export was modified after harden wrote it: {what}",
                                "export the run again rather than editing the folder")
    return report


def hub_endpoint() -> str:
    """HF_ENDPOINT as set now, else huggingface_hub's (read when it was imported)."""
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def commit_message(report: dict) -> str:
    version = report.get("harden_version") or __version__
    recipe = str(report.get("recipe_sha256") or "unknown")
    return f"harden {version}: {report.get('layout', 'hardened')} export, recipe sha256 {recipe[:12]}"


def push_export(folder: Path, repo_id: str, *, private: bool = False, create_pr: bool = False,
                revision: str | None = None, token: str | None = None) -> dict:
    """Create the repo if needed and publish the export folder in one commit; returns what was pushed where.

    The repository afterwards mirrors the export (remote files the export lacks are deleted in the same commit,
    `.gitattributes` excepted), so no file of an earlier upload, e.g. unpruned weights, survives next to it.
    """
    folder = Path(folder)
    if not _REPO_ID.match(repo_id or ""):
        raise BadInputError(f"invalid repo id {repo_id!r}", "use ORG/NAME, e.g. --repo-id acme/sd15-hardened")
    report = check_export(folder)

    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, constants
    from huggingface_hub.utils import get_token

    if constants.is_offline_mode():
        raise HubError("cannot push: HF_HUB_OFFLINE is set", "unset HF_HUB_OFFLINE to reach the Hub")
    register_secret(token)  # every message scrubs it (harden.scrub), as it scrubs HF_TOKEN
    endpoint = hub_endpoint()
    api = HfApi(endpoint=endpoint, token=token)
    has_token = bool(token or get_token())
    message = commit_message(report)
    description = (f"Pushed by harden {__version__}.\n\nrecipe sha256: {report.get('recipe_sha256')}\n"
                   f"harden version of the run: {report.get('harden_version')}\n"
                   f"gates: {len(report.get('gates') or [])} passed")
    local = _local_files(folder)

    def step(what: str, call):
        try:
            return call()
        except HardenError:
            raise
        except Exception as err:
            raise _hub_error(err, what, endpoint, repo_id, has_token) from None

    step("creating the repository", lambda: api.create_repo(repo_id, repo_type="model", private=private,
                                                             exist_ok=True))
    if private and not step("reading the repository", lambda: api.model_info(repo_id)).private:
        raise HubError(f"{repo_id} already exists and is public; --private cannot make it private",
                       "change its visibility on the Hub first, or push without --private")
    if revision and revision != "main":
        step(f"creating branch {revision}", lambda: api.create_branch(repo_id, branch=revision, exist_ok=True))
    before = step("reading the repository", lambda: api.model_info(repo_id, revision=revision or "main"))
    remote = [s.rfilename for s in before.siblings or []]
    operations = [CommitOperationDelete(path_in_repo=p) for p in remote if p not in local and p != ".gitattributes"]
    operations += [CommitOperationAdd(path_in_repo=p, path_or_fileobj=str(folder / p)) for p in local]
    info = step("committing the export", lambda: api.create_commit(
        repo_id, operations, commit_message=message, commit_description=description, repo_type="model",
        revision=revision, create_pr=create_pr))
    return {"repo_id": repo_id, "endpoint": scrub(endpoint), "commit": info.oid,
            "commit_url": scrub(info.commit_url), "pr_url": info.pr_url and scrub(info.pr_url),
            "pr_revision": info.pr_revision, "revision": revision or "main",
            "message": message, "files": len(local), "unchanged": info.oid == before.sha and not info.pr_url,
            "deleted": sum(isinstance(o, CommitOperationDelete) for o in operations)}


def _hub_error(err: Exception, what: str, endpoint: str, repo_id: str, has_token: bool) -> HubError:
    """One line for any client failure; server text is cut to its first line (it never contains the token)."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if isinstance(err, OfflineModeIsEnabled):
        return HubError(f"cannot push while {what}: HF_HUB_OFFLINE is set", "unset HF_HUB_OFFLINE to reach the Hub")
    if isinstance(err, HfHubHTTPError) and err.response is not None:
        status = err.response.status_code
        server = (err.server_message or "").strip().splitlines()
        reason = f"HTTP {status}" + (f": {server[0][:200]}" if server else "")
        where = f"the Hub at {endpoint} failed while {what} for {repo_id} ({reason})"
        if status == 401:
            return HubError(f"{where}; " + ("the token was refused" if has_token else "no token was found"),
                            _LOGIN_HINT)
        if status == 403:
            return HubError(f"{where}; the token cannot write to {repo_id}",
                            f"use a token with write access to {repo_id.split('/')[0]}")
        if status >= 500:
            return HubError(f"{where}; nothing was published and the local export is unchanged",
                            "retry the same `harden push` later")
        return HubError(where, "check the repo id, --revision and your access rights" +
                        ("" if has_token else f"; {_LOGIN_HINT}"))
    first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
    return HubError(f"cannot reach the Hub at {endpoint} while {what}: {type(err).__name__}: {first}",
                    "check the network and HF_ENDPOINT; the local export is unchanged")

