"""Every error a user can act on, under one root, so the magic and the CLI catch them in one place.

Each message says what happened and the command that fixes it. Errors that never reach a user
(a malformed frame, a body the Firecracker spec rejects, a retry signal) stay beside their code;
where one can escape to a user it is wrapped in one of these first.
"""

from __future__ import annotations

from pathlib import Path


class DhvmError(Exception):
    """A problem the user can act on; the message says what happened and the command that fixes it."""

    def _render_traceback_(self) -> list[str]:
        """IPython shows the message alone: the host's stack says nothing the user can act on."""
        return [f"\x1b[0;31m{type(self).__name__}\x1b[0m: {self}"]


# -- before a cell runs ---------------------------------------------------------------------------


class UsageError(DhvmError):
    """A magic or command was called wrongly (an unknown subcommand, a bad ``-o`` name)."""


class FileLimitError(DhvmError):
    """The files a cell names add up to more than the push limit; the cell is not run."""


class FileNotPushable(DhvmError):
    """A file named explicitly (``--file``) cannot be pushed."""


class CellTooLarge(DhvmError):
    """A cell's code does not fit in one request header."""


# -- starting an instance -------------------------------------------------------------------------


class BackendUnavailable(DhvmError):
    """The backend cannot run here; the message says why and what fixes it."""


class FirecrackerMissing(BackendUnavailable):
    """No usable Firecracker binary; the message says how to supply one."""


class NetworkSetupError(BackendUnavailable):
    """Guest networking could not be set up; the message says what is missing."""


class JavaBuildError(BackendUnavailable):
    """The agent's Java classes could not be compiled; the message says why and what fixes it."""


class AgentStartError(DhvmError):
    """An instance was started (or restored) but its agent never answered."""


class NotEnoughMemory(AgentStartError):
    """A new server would not fit in the memory left free (the host's or this process's cgroup's); none was started."""


class ProtocolMismatch(AgentStartError):
    """The agent speaks another protocol version than this host: the image is older than the host code."""


class VMMError(DhvmError):
    """The VMM (QEMU, Firecracker) refused a request; the message carries its own words."""


class FirecrackerAPIError(VMMError):
    """Firecracker answered an API call with an error."""

    def __init__(self, method: str, path: str, status: int, fault: str, hint: str = ""):
        self.method, self.path, self.status, self.fault = method, path, status, fault
        msg = f"Firecracker refused {method} {path} (HTTP {status}): {fault}"
        super().__init__(msg + (f"\n  next: {hint}" if hint else ""))


# -- while an instance runs -----------------------------------------------------------------------


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


class AgentRefused(DhvmError):
    """The agent answered a request with an error (a missing table, a bad request)."""


# -- tables as local files --------------------------------------------------------------------------


class TableFileError(DhvmError):
    """A table could not be written to a local file (``fetch --to``) or read from one (``-i NAME=FILE``);
    nothing was left under the file's name."""


# -- dhvm prepare -----------------------------------------------------------------------------------


class CheckpointError(DhvmError):
    """A checkpoint could not be saved, found or restored (the message names the fix)."""


class PrepareError(DhvmError):
    """A prepare phase failed; the message names the phase, the log and what to do next."""

    def __init__(self, phase: str, why: str, log_path: Path, hint: str):
        self.phase = phase
        super().__init__(f"dhvm prepare failed in phase '{phase}': {why}\n  log: {log_path}\n  next: {hint}")
