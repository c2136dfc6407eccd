"""Errors users see: one line with a code, what is wrong, where, and how to fix it.

Exit codes (RELIABILITY.md): 0 ok, 1 input/config, 2 usage, 3 resources, 4 numerical stop,
5 security refusal, 130 interrupted with a checkpoint saved.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_INPUT = 1
EXIT_USAGE = 2
EXIT_RESOURCES = 3
EXIT_NUMERICS = 4
EXIT_SECURITY = 5
EXIT_INTERRUPTED = 130


class MlxptError(Exception):
    """An error meant for the user: `code: what (where) - hint`, with an exit code."""

    exit_code = EXIT_INPUT
    saved_step: int | None = None  # set when a checkpoint of this step was saved just before the raise

    def __init__(self, code: str, what: str, where: str | None = None, hint: str | None = None):
        self.code, self.what, self.where, self.hint = code, what, where, hint
        super().__init__(self.line())

    def line(self) -> str:
        s = f"{self.code}: {self.what}"
        if self.where:
            s += f" ({self.where})"
        if self.hint:
            s += f" - {self.hint}"
        return s.replace("\n", " ")


class DataError(MlxptError):
    """A dataset row or file is invalid. `errors` holds every problem found, one line each."""

    def __init__(self, code, what, where=None, hint=None, errors: list[MlxptError] | None = None):
        super().__init__(code, what, where, hint)
        self.errors = errors or [self]


class ConfigError(MlxptError):
    pass


class ModelError(MlxptError):
    pass


class SecurityError(MlxptError):
    exit_code = EXIT_SECURITY


class ResourceError(MlxptError):
    exit_code = EXIT_RESOURCES


class NumericsError(MlxptError):
    exit_code = EXIT_NUMERICS
