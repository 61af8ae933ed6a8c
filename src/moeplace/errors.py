"""Errors that the CLI turns into one clean line and an exit code (never a traceback)."""

from __future__ import annotations


class MoeplaceError(Exception):
    """Bad input or an impossible request: printed as one line, exit code 2 (or the one given)."""

    exit_code = 2

    def __init__(self, message: str, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class TraceError(MoeplaceError):
    """A trace file is malformed, truncated or inconsistent."""


class PlacementError(MoeplaceError):
    """A placement file is malformed or does not fit the trace/model it is used with."""


class AlreadyReported(MoeplaceError):
    """A failure whose one line was printed elsewhere (by a serve rank): exit with its code, say nothing."""

    def __init__(self, exit_code: int) -> None:
        super().__init__(f"exit code {exit_code}", exit_code)


class MoeplaceWarning(UserWarning):
    """Something worth knowing that does not stop the work (a file read by another tool's
    convention, a count taken by default). Library callers see it through the `warnings`
    module (filter it, or turn it into an error); the CLI prints it as one line on stderr."""


def warn(message: str) -> None:
    """Emit a MoeplaceWarning from library code (never print: an embedding program decides)."""
    import warnings

    warnings.warn(message, MoeplaceWarning, stacklevel=3)
