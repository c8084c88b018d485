"""Errors a user can act on: one root, so the magic and the CLI catch what the user can fix in one place."""

from __future__ import annotations


class DhvmError(Exception):
    """A problem the user can act on; the message says what happened and the command that fixes it."""


class AgentDied(DhvmError):
    """The agent (or its VM) went away in the middle of a request."""

    def __init__(self, message: str, death: dict | None = None):
        super().__init__(message)
        self.death = death
        """What the VM's init reported (reason, signal or exit code, OOM figures), when it could."""


class AgentUnresponsive(DhvmError):
    """The agent did not stop a cancelled cell in time; its instance was replaced."""


class AnswerAbandoned(DhvmError):
    """A question (completion, inspection) was not answered in time; the answer is dropped, the VM kept."""


class CellTooLarge(DhvmError):
    """A cell's code does not fit in one request header."""
