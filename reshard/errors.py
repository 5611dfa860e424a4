"""Errors a user can act on. Each message is one line that names the file, tensor or key and says the fix."""

from __future__ import annotations


class ReshardError(Exception):
    """Base class: the CLI prints the message on stderr and exits 1."""


class InputError(ReshardError):
    """A checkpoint, config or manifest that cannot be read as given."""


class RulesError(ReshardError):
    """A rules file that is not valid."""


class UsageError(ReshardError):
    """A command-line value that cannot work (the CLI exits 2, as for other bad flags)."""


class OutputError(ReshardError):
    """An output location that cannot be written safely."""


class PlanError(ReshardError):
    """A plan that cannot be carried out; holds one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))
