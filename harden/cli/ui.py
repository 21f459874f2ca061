"""What the terminal sees: one-line errors with their exit codes, progress bars, quiet libraries.

Why apart from the commands: every command (run, push, bench, audit, scan) reports errors the same way, and the
library never imports typer or rich; only the CLI does.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import signal
import threading
import warnings

import typer

from ..errors import BadInputError, HardenError, RunInterrupted, Terminated
from ..scrub import scrub

state = {"debug": False}


def fail(err: HardenError):
    """One line on stderr (scrubbed of secrets) and the error's exit code; the traceback only with --debug."""
    if state["debug"]:
        raise err
    typer.secho(f"error: {scrub(err.one_line())}", err=True, fg="red")
    raise typer.Exit(err.exit_code)


def known_failure(err: BaseException) -> HardenError | None:
    """The one place that maps a failure to its exit code: a HardenError as it is, the failure classes harden knows
    (interrupts, permissions, a full or read-only disk, memory, nesting) to their one line; None for anything else,
    which is a bug in harden (exit 1 with its traceback)."""
    if isinstance(err, HardenError):
        return err
    if isinstance(err, KeyboardInterrupt):  # a run converts its own (with what is saved); this is anything else
        signum = getattr(err, "signum", signal.SIGINT)
        return RunInterrupted(f"{signal.Signals(signum).name} stopped harden before it finished", "", signum)
    where = f" ({err.filename})" if isinstance(err, OSError) and err.filename else ""
    if isinstance(err, PermissionError):
        return BadInputError(f"permission denied{where}", "check the permissions of that path")
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return BadInputError(f"no space left on the device{where}", "free disk space or choose another --out")
    if isinstance(err, OSError) and err.errno == errno.EROFS:
        return BadInputError(f"read-only file system{where}", "choose another --out")
    if isinstance(err, NotADirectoryError):
        return BadInputError(f"a part of a path is a file, not a folder{where}", "choose another path")
    if isinstance(err, RecursionError):
        return BadInputError("an input is nested too deeply to read", "check the recipe and the files it names")
    if isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError":  # torch's CUDA/MPS OOM
        first = (str(err).strip().splitlines() or ["out of memory"])[0][:200]
        return BadInputError(f"out of memory: {first}", "lower the batch sizes (detection.batch_size, "
                             "localization.batch_size, verify.batch_images) or use a device with more memory")
    return None


def _terminate(signum, frame):
    raise Terminated(signum)


def scrubbed_library_output() -> None:
    """Library log records and warnings pass through harden.scrub too: a client may log a URL with credentials."""
    make = logging.getLogRecordFactory()
    if getattr(make, "harden_scrubbed", False):
        return

    def record(*args, **kwargs):
        rec = make(*args, **kwargs)
        try:
            rec.msg, rec.args = scrub(rec.getMessage()), ()
        except Exception:  # noqa: BLE001 - a malformed record is logging's to report, as it would be without us
            pass
        return rec

    record.harden_scrubbed = True
    logging.setLogRecordFactory(record)
    format_warning = warnings.formatwarning
    warnings.formatwarning = lambda *args, **kwargs: scrub(format_warning(*args, **kwargs))


@contextlib.contextmanager
def failing_as_one_line():
    """Turn a known failure raised in the block into `fail` (one line, its exit code; `known_failure`). SIGTERM
    stops the block like Ctrl-C (cleanup runs, exit 143) instead of killing the process on the spot."""
    scrubbed_library_output()
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if main else None
    try:
        yield
    except BaseException as err:
        known = known_failure(err)
        if known is None or (state["debug"] and known is not err):
            raise
        fail(known)
    finally:
        if main and previous is not None:
            signal.signal(signal.SIGTERM, previous)


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

            def advance(n: int = 1, note: str | None = None) -> None:
                progress.update(task, advance=n, **({"description": f"{name} ({note})"} if note else {}))

            yield advance

    def log(self, message: str) -> None:
        self.console.print(scrub(message), highlight=False, markup=False)
