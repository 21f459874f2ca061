"""Errors that carry an exit code and a hint, so the CLI can print one line and exit distinctly."""

from __future__ import annotations

import re
import signal

from .scrub import scrub

EXIT_BAD_INPUT = 2
EXIT_GATE_FAILED = 3
EXIT_HUB_ERROR = 4


class HardenError(Exception):
    """Base error: `str(err)` is the one-line reason, `hint` says how to fix it."""

    exit_code = 1

    def __init__(self, message: str, hint: str = ""):
        super().__init__(scrub(message))  # never a token or URL password, whoever prints or logs the error
        self.hint = scrub(hint)

    def one_line(self) -> str:
        text = f"{self}" + (f" (hint: {self.hint})" if self.hint else "")
        return re.sub(r"\s*[\r\n]+\s*", " ", text)  # one line, whatever a library's message held


class BadInputError(HardenError):
    """The user gave something harden cannot use (recipe, model, prompts, parameters)."""

    exit_code = EXIT_BAD_INPUT


class TargetError(BadInputError):
    """The model has no usable cross-attention value projections, or they cannot be pruned exactly."""


class GateFailedError(HardenError):
    exit_code = EXIT_GATE_FAILED


class HubError(HardenError):
    exit_code = EXIT_HUB_ERROR


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread by the CLI's handler: stops a run exactly as Ctrl-C does (cleanup runs,
    workers stop cooperatively), but exits 143 instead of 130."""

    def __init__(self, signum: int = signal.SIGTERM):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class RunInterrupted(HardenError):
    """A run stopped by SIGINT (exit 130) or SIGTERM (exit 143); what it finished is saved and can be resumed."""

    def __init__(self, message: str, hint: str = "", signum: int = signal.SIGINT, resume_flags: str = "--resume"):
        super().__init__(message, hint)
        self.signum = signum
        self.exit_code = 128 + int(signum)
        self.resume_flags = resume_flags  # what continues the run (the CLI writes the whole command line)
