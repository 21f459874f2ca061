"""The `harden` command line: parses arguments, calls the library, turns HardenError into one line + exit code."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from . import __version__
from .errors import HardenError

app = typer.Typer(help="Harden a diffusion model against regurgitating memorized training images.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
_state = {"debug": False}


def _version(value: bool):
    if value:
        typer.echo(f"harden {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[Optional[bool], typer.Option("--version", "-V", callback=_version, is_eager=True,
                                                    help="Print the version and exit.")] = None,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False,
):
    _state["debug"] = debug


def _fail(err: HardenError):
    if _state["debug"]:
        raise err
    typer.secho(f"error: {err.one_line()}", err=True, fg="red")
    raise typer.Exit(err.exit_code)


def _quiet_libraries():
    """Library progress bars off: harden reports progress itself."""
    from diffusers.utils import logging as dlog
    from huggingface_hub.utils import disable_progress_bars

    dlog.disable_progress_bar()
    disable_progress_bars()


@app.command()
def demo(out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Write the pruned model here.")] = None):
    """Run calibrate -> detect -> localize -> prune on a tiny model with one planted memorization neuron."""
    _quiet_libraries()
    from .demo import run_demo

    try:
        summary = run_demo(out, log=typer.echo)
    except HardenError as err:
        _fail(err)
    if not summary["found_planted"] or summary["score_after_pruning"] >= summary["threshold"]:
        typer.secho("error: the planted neuron was not found or pruning did not remove memorization", err=True)
        raise typer.Exit(1)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
