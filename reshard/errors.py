"""Errors a user can act on. Each message is one line that names the file, tensor or key and says the fix.

The CLI prints the message as `Error: ...` on stderr and exits with the class's `exit_code`: 2 for a usage
error, as for any other bad flag, and 1 for everything else.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass


def shown(name: str) -> str:
    """A name as an error line shows it: quoted when it holds line breaks or other unprintable characters."""
    return name if name.isprintable() else json.dumps(name)


def one_line(message: str) -> str:
    """A message made one line whatever names it holds: line breaks escaped."""
    return message.replace("\r", "\\r").replace("\n", "\\n")


class ReshardError(Exception):
    """Base class of every error reshard raises on purpose."""

    exit_code = 1


class UsageError(ReshardError):
    """A command-line value or argument that cannot work."""

    exit_code = 2


class InputError(ReshardError):
    """A checkpoint, config, manifest or split folder that cannot be read as given."""


class RulesError(InputError):
    """A rules file that is not valid."""


class OutputError(ReshardError):
    """An output location that cannot be written safely, or a write that failed."""


@dataclass(frozen=True)
class Problem:
    """One reason a plan cannot be carried out: the tensor it is about (None when it is the config or --tp as a
    whole) and the line a user reads, which names it and says the fix."""

    tensor: str | None
    line: str

    def __str__(self) -> str:
        return self.line


class PlanError(ReshardError):
    """A plan that cannot be carried out; holds every problem found, in the order they are told."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(p.line for p in self.problems))

    @property
    def lines(self) -> list[str]:
        return [p.line for p in self.problems]


class CheckFailed(ReshardError):
    """A check (verify) that ran and found problems; one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))
