"""Errors that carry an exit code and a hint, so the CLI can print one line and exit distinctly."""

from __future__ import annotations

EXIT_BAD_INPUT = 2
EXIT_GATE_FAILED = 3
EXIT_HUB_ERROR = 4


class HardenError(Exception):
    """Base error: `str(err)` is the one-line reason, `hint` says how to fix it."""

    exit_code = 1

    def __init__(self, message: str, hint: str = ""):
        super().__init__(message)
        self.hint = hint

    def one_line(self) -> str:
        return f"{self}" + (f" (hint: {self.hint})" if self.hint else "")


class BadInputError(HardenError):
    """The user gave something harden cannot use (recipe, model, prompts, parameters)."""

    exit_code = EXIT_BAD_INPUT


class TargetError(BadInputError):
    """The model has no usable cross-attention value projections, or they cannot be pruned exactly."""


class GateFailedError(HardenError):
    exit_code = EXIT_GATE_FAILED


class HubError(HardenError):
    exit_code = EXIT_HUB_ERROR
