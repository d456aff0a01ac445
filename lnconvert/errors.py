"""Errors that carry a one-line message and a documented process exit code.

The CLI prints ``str(error)`` on one line and exits with ``error.exit_code``;
anything else escaping is a bug (shown with a traceback only under ``--debug``).
"""
from __future__ import annotations


class LnConvertError(Exception):
    """Base class: a user-facing failure with a one-line message."""

    exit_code = 1


class UsageError(LnConvertError):
    """Options that contradict each other or cannot apply to this model."""

    exit_code = 2


class ModelSourceError(LnConvertError):
    """The model name, import path or weights file cannot be loaded."""

    exit_code = 3


class TraceError(LnConvertError):
    """torch.fx cannot trace the model; the message names the module and why."""

    exit_code = 4


class ParityError(LnConvertError):
    """The converted model does not reproduce the original within tolerance."""

    exit_code = 5

    def __init__(self, message: str, report=None):
        super().__init__(message)
        self.report = report


class OutputError(LnConvertError):
    """The output path exists (without --force), is a directory or is not writable."""

    exit_code = 6


class UnsupportedModelError(LnConvertError):
    """The model contains something lnconvert refuses to convert (e.g. NaN weights)."""

    exit_code = 7


class PassError(LnConvertError):
    """A conversion pass left the graph inconsistent (a bug in lnconvert); the message names the pass."""

    exit_code = 1

    def __init__(self, pass_name: str, problem: str):
        super().__init__(f"pass {pass_name}: {problem}")
        self.pass_name = pass_name


class DistributedError(LnConvertError):
    """A multi-process (torchrun) run lost a process or could not join its process group."""

    exit_code = 8


EXIT_CODES = {
    0: "success: converted and (if asked) verified",
    1: "internal error (a bug: rerun with --debug and report it)",
    UsageError.exit_code: "bad command-line usage or contradictory options",
    ModelSourceError.exit_code: "model name, import path or weights cannot be loaded",
    TraceError.exit_code: "the model cannot be traced with torch.fx",
    ParityError.exit_code: "verification failed: outputs differ beyond tolerance",
    OutputError.exit_code: "output path exists (use --force), is a directory or unwritable",
    UnsupportedModelError.exit_code: "the model has something lnconvert refuses to convert",
    DistributedError.exit_code: "a process of a multi-process (torchrun) run was lost or could not join",
    130: "interrupted (Ctrl-C); no partial output is left",
}


def one_line(exc: BaseException) -> str:
    """``Type: first line of the message``, for errors that wrap another one."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"
