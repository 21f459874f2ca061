"""What the terminal sees: one-line errors with their exit codes, progress bars, quiet libraries.

Why apart from the commands: every command (run, push, bench, audit, scan) reports errors the same way, and the
library never imports typer or rich; only the CLI does.
"""

from __future__ import annotations

import contextlib
import warnings

import typer

from ..errors import HardenError

state = {"debug": False}


def fail(err: HardenError):
    """One line on stderr and the error's exit code; the traceback only with --debug."""
    if state["debug"]:
        raise err
    typer.secho(f"error: {err.one_line()}", err=True, fg="red")
    raise typer.Exit(err.exit_code)


@contextlib.contextmanager
def failing_as_one_line():
    """Turn a HardenError raised in the block into `fail` (one line, its exit code)."""
    try:
        yield
    except HardenError as err:
        fail(err)


def quiet_libraries():
    """Library progress bars off: harden reports progress itself."""
    from diffusers.utils import logging as dlog
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as tlog

    for category in (FutureWarning, DeprecationWarning):  # upstream deprecation notices are not for our users
        warnings.filterwarnings("ignore", category=category, module=r"(diffusers|transformers|huggingface_hub|torch)")
    dlog.disable_progress_bar()
    dlog.set_verbosity_error()
    tlog.disable_progress_bar()
    tlog.set_verbosity_error()
    disable_progress_bars()


class RichUI:
    """Progress bars per stage (rich, on stderr) and log lines; library progress bars are switched off."""

    def __init__(self):
        from rich.console import Console

        self.console = Console(stderr=True)

    @contextlib.contextmanager
    def stage(self, name: str, total: int | None = None):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=self.console, transient=False) as progress:
            task = progress.add_task(name, total=total)
            yield lambda n=1: progress.advance(task, n)

    def log(self, message: str) -> None:
        self.console.print(message, highlight=False, markup=False)
