"""The one exception type for bad input.

Users fix their files from the message alone, so every error names where the problem is (file,
line, field) and what would fix it; the CLI prints it without a traceback and exits non-zero.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Problem:
    """One thing wrong with an input, located precisely enough to fix it."""

    message: str
    path: str | Path | None = None
    line: int | None = None
    field: str | None = None
    hint: str | None = None

    def __str__(self) -> str:
        where = ""
        if self.path is not None:
            where = str(self.path)
            if self.line is not None:
                where += f":{self.line}"
            where += ": "
        field = f"field '{self.field}': " if self.field else ""
        hint = f" ({self.hint})" if self.hint else ""
        return f"{where}{field}{self.message}{hint}"


class InputError(Exception):
    """Bad user input: shown as a one-line (or one-per-problem) message, never as a traceback."""

    def __init__(self, message: str | Problem | list[Problem], **where) -> None:
        if isinstance(message, list):
            self.problems = list(message)
        elif isinstance(message, Problem):
            self.problems = [message]
        else:
            self.problems = [Problem(message, **where)]
        super().__init__(self._render())

    def _render(self) -> str:
        if len(self.problems) == 1:
            return str(self.problems[0])
        lines = [f"{len(self.problems)} problems:"] + [f"  {p}" for p in self.problems]
        return "\n".join(lines)
