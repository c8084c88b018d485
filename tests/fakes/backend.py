"""A fake backend: instances that run the fake agent (``tests/fakes/agent.py``), so tests of sessions
and the magic start no JVM and no VM.

Each instance is a real subprocess (``python tests/fakes/agent.py``) in its own process group, with a
real run directory and instance record (``instances.new_instance``), reached over a unix socket like
the local backend's agent. A subprocess rather than a thread: "the agent died" is then a real death
(the process exits, its socket closes, ``alive()`` turns False, the instance record's process is
gone), exactly what the host sees of a crashed agent or VM; a thread cannot die without taking the
test with it, and a hung thread could not be killed. Its cost is one Python start without imports
of note (~30 ms).

``install()`` registers it under the name ``fake``: ``Session("fake", home)`` or ``%config
Dhvm.backend = 'fake'`` then use it. Options (the session's backend options): ``delay`` (seconds
every answer of the agent waits: a slow agent), ``hello_delay`` (seconds before the agent listens:
a slow start).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from dhg_kernel.errors import AgentStartError
from dhg_kernel.instances import new_instance
from dhg_kernel.vm import register_backend
from dhg_kernel.vm.base import Backend, Instance, connect_unix

AGENT_SCRIPT = Path(__file__).with_name("agent.py")
NAME = "fake"


class FakeInstance(Instance):
    """One fake agent process."""

    def __init__(self, record, proc: subprocess.Popen):
        super().__init__(record)
        self.proc = proc

    @property
    def socket_path(self) -> Path:
        return self.dir / "agent.sock"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def connect(self, timeout: float) -> socket.socket:
        return connect_unix(self.socket_path, timeout, self.alive, what="the fake agent")

    def stop(self) -> None:
        super().stop()  # kills the recorded process group, removes the run directory
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


class FakeBackend(Backend):
    """Starts fake agents; no checkpoints, no forks (the base class's refusals)."""

    name = NAME
    isolation = "none (a fake agent, for tests)"
    can_checkpoint = False
    can_fork = False

    def __init__(self, layout, delay: float = 0.0, hello_delay: float = 0.0, start_timeout: float = 10.0,
                 start_from: str | None = None, **_ignored):
        self.layout = layout
        self.delay = delay
        self.hello_delay = hello_delay
        self.start_timeout = start_timeout
        self.start_from = start_from
        self.started: list[FakeInstance] = []
        """Every instance this backend started, in order (for tests to count them)."""

    def start(self, checkpoint: str | None = None) -> FakeInstance:
        rec = new_instance(self.layout, self.name)
        cmd = [sys.executable, str(AGENT_SCRIPT), "--socket", os.path.join(rec.dir, "agent.sock"),
               "--workdir", os.path.join(rec.dir, "work"), "--delay", str(self.delay),
               "--hello-delay", str(self.hello_delay)]
        with open(os.path.join(rec.dir, "agent.log"), "ab") as log:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    cwd=rec.dir, start_new_session=True)
        rec.add_process(proc.pid, "agent")
        rec.save()
        inst = FakeInstance(rec, proc)
        try:
            inst.connect(self.start_timeout).close()
        except AgentStartError as e:
            tail = inst.log_tail()
            inst.stop()
            raise AgentStartError(f"fake agent failed to start: {e}\n--- agent.log ---\n{tail}") from None
        self.started.append(inst)
        return inst


def install() -> None:
    """Make ``get_backend("fake", layout, **options)`` build a FakeBackend."""
    register_backend(NAME, FakeBackend)
