"""`harden push`: publish a hardened export to the Hub in one commit."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..hub import find_export, push_export
from .ui import failing_as_one_line


def push_command(
    run_dir: Annotated[Path, typer.Argument(help="RUN_DIR of `harden run`, or one of its export/<layout> folders.")],
    repo_id: Annotated[str, typer.Option("--repo-id", help="Hub repository ORG/NAME; created if missing.")],
    private: Annotated[bool, typer.Option("--private", help="Create the repository as private.")] = False,
    create_pr: Annotated[bool, typer.Option("--create-pr", help="Open a pull request instead of committing "
                                                                "to the branch.")] = False,
    revision: Annotated[Optional[str], typer.Option("--revision", help="Branch to push to (created if "
                                                                        "missing); default main.")] = None,
    layout: Annotated[Optional[str], typer.Option("--layout", help="compact or dense; default: the only one, "
                                                                    "compact when both exist.")] = None,
):
    """Publish a hardened export to the Hugging Face Hub in one commit (token: HF_TOKEN or `hf auth login`)."""
    with failing_as_one_line():
        folder = find_export(run_dir, layout)
        result = push_export(folder, repo_id, private=private, create_pr=create_pr, revision=revision)
    where = result["pr_url"] or f"{result['endpoint']}/{repo_id} ({result['revision']})"
    if result["unchanged"]:
        typer.echo(f"{where} already holds this export (commit {result['commit']}); nothing to push")
        return
    removed = f", {result['deleted']} removed" if result["deleted"] else ""
    typer.echo(f"pushed {folder} to {where}: commit {result['commit']} ({result['files']} files{removed})")
