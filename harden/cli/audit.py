"""`harden audit`: what a pipeline folder still gives back from a recipe's memorized prompts (harden.audit)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .ui import RichUI, failing_as_one_line, quiet_libraries


def audit_command(
    recipe: Annotated[Path, typer.Argument(help="The recipe YAML: memorized prompts, `audit:` section, gates.",
                                           show_default=False)],
    model: Annotated[Path, typer.Option("--model", "-m", help="Pipeline folder to audit (base, a harden export "
                                        "compact or dense, another tool's output).", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder for audit.json, targets and figures.",
                                      show_default=False)],
    base: Annotated[Optional[Path], typer.Option("--base", help="Base pipeline for surrogate targets (default: the "
                                                 "recipe's model, when local).")] = None,
    gate: Annotated[Optional[list[str]], typer.Option("--gate", help="A gate NAME<=X or NAME>=X on an audit "
                                                      "fraction (repeatable; adds to the recipe's).")] = None,
    threshold: Annotated[Optional[float], typer.Option("--threshold", help="Similarity threshold (default: the "
                                                       "recipe's for its metric).")] = None,
    device: Annotated[Optional[str], typer.Option("--device", help="Override model.device.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing audit folder.")] = False,
):
    """Audit a pipeline: prompts, paraphrases, the embedding attack and a control; exit 3 when a gate fails."""
    from ..audit.command import audit_folder
    from ..recipe import load_recipe

    quiet_libraries()
    ui = RichUI()
    with failing_as_one_line():
        data = audit_folder(load_recipe(recipe), model, out, base=base, gates=gate or [], threshold=threshold,
                            device=device, overwrite=overwrite, ui=ui)
    typer.echo(f"wrote {out / 'audit.json'}" + (" (all audit gates passed)" if data["gates"] else ""))
