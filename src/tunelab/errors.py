"""User-facing errors: the CLI prints them as one or two lines with the fix, no traceback.

Internal bugs are ordinary exceptions and keep their tracebacks.
"""

from __future__ import annotations

# Exit codes the CLI and `tunelab train` use; documented in docs/cli.md.
EXIT_USER_ERROR = 2
EXIT_NONFINITE = 3
EXIT_RESUMABLE = 75  # EX_TEMPFAIL: interrupted by a signal, checkpoint written, `--resume` continues


class TunelabError(Exception):
    """An error caused by the user's input; `fix` says what to change."""

    exit_code = EXIT_USER_ERROR

    def __init__(self, message: str, fix: str | None = None):
        super().__init__(message)
        self.message = message
        self.fix = fix

    def __str__(self) -> str:
        return self.message if not self.fix else f"{self.message}\n  fix: {self.fix}"


class ConfigError(TunelabError):
    """A bad config key, type or value."""


class DataError(TunelabError):
    """Bad records in a dataset; `problems` holds one `file:line: reason` string each."""

    def __init__(self, message: str, fix: str | None = None, problems: list[str] | None = None):
        super().__init__(message, fix)
        self.problems = problems or []

    def __str__(self) -> str:
        lines = [self.message, *self.problems[:50]]
        if len(self.problems) > 50:
            lines.append(f"... and {len(self.problems) - 50} more")
        if self.fix:
            lines.append(f"  fix: {self.fix}")
        return "\n".join(lines)


class NonFiniteError(TunelabError):
    """Loss or gradient norm became NaN/inf; the optimizer step was not applied."""

    exit_code = EXIT_NONFINITE


class ResumeError(TunelabError):
    """A resume that would silently replay or skip data, or has nothing to resume."""


class UnsafeFileError(TunelabError):
    """A pickle-based file (.bin/.pt/.pth/.ckpt) met without an explicit trust flag."""
