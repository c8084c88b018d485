"""The local backend: the guest agent as a plain subprocess on the host, over a unix socket.

No isolation: for hosts without virtualization and for fast tests of everything above the VM layer.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys

from ..config import AGENT_START_TIMEOUT_S, Layout
from ..errors import CheckpointError
from ..guest_java import local_classes
from ..instances import new_instance
from .base import AgentStartError, Backend, BackendUnavailable, Instance, connect_unix, new_key


AGENT_MODULE = "dhg_kernel.guest.agent"


class LocalInstance(Instance):
    """An agent subprocess in its own session (so its whole process group can be killed)."""

    def __init__(self, record, proc: subprocess.Popen):
        super().__init__(record)
        self.proc = proc

    @property
    def socket_path(self):
        return self.dir / "agent.sock"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def connect(self, timeout: float) -> socket.socket:
        return connect_unix(self.socket_path, timeout, self.alive)

    def stop(self) -> None:
        super().stop()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


class LocalBackend(Backend):
    """Runs ``python -m dhg_kernel.guest.agent`` with the host's (or a configured) Python."""

    name = "local"

    # Options meant for VM backends (network, firecracker, …) are ignored: a host process has the host's.
    def no_checkpoints(self) -> str:
        return ("the local backend runs Deephaven as a plain process, which cannot be saved and brought back: "
                "checkpoints need a microVM. Use %config Dhvm.backend = 'qemu' (or --backend qemu; run "
                "dhvm prepare once first)")

    def __init__(self, layout: Layout, python: str | None = None, heap: str = "2g",
                 start_timeout: float = AGENT_START_TIMEOUT_S, start_from: str | None = None, **_ignored):
        self.start_from = start_from  # a checkpoint's name: refused at start (see no_checkpoints)
        self.layout = layout
        self.python = python or sys.executable
        self.heap = heap
        self.start_timeout = start_timeout

    def check(self) -> None:
        """Raise BackendUnavailable when the agent's Python cannot run Deephaven."""
        if self.python == sys.executable and importlib.util.find_spec("deephaven_server") is None:
            raise BackendUnavailable(
                f"deephaven-server is not installed for {self.python}, so the local backend cannot start a "
                f"Deephaven server. Run: pip install 'dhg_kernel[local]'")

    def start(self, checkpoint: str | None = None) -> LocalInstance:
        if checkpoint or self.start_from:
            raise CheckpointError(self.no_checkpoints())
        self.check()
        classes = local_classes(self.layout.private_dir(self.layout.cache))  # JavaBuildError (a BackendUnavailable) says what to install
        rec = new_instance(self.layout, self.name)
        sock = os.path.join(rec.dir, "agent.sock")
        cmd = [self.python, "-m", AGENT_MODULE, "--socket", sock,
               "--workdir", os.path.join(rec.dir, "work"), "--heap", self.heap,
               "--owner-pid", str(os.getpid()), "--classes", str(classes)]
        env = dict(os.environ)
        # The agent's (and its JVM's) temp files live in the instance dir and go with it.
        env["TMPDIR"] = os.path.join(rec.dir, "tmp")
        os.makedirs(env["TMPDIR"], mode=0o700)
        # The server's login key: in the environment (readable only by this uid), never in argv.
        key = new_key()
        env["DHG_KEY"] = key
        # The agent is dhg_kernel.guest.agent and imports dhg_kernel.protocol: make this very copy
        # importable, whatever the Python.
        pkg_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (pkg_root, env.get("PYTHONPATH")) if p)
        with open(os.path.join(rec.dir, "agent.log"), "ab") as log:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    cwd=rec.dir, env=env, start_new_session=True)
        rec.add_process(proc.pid, "agent")
        rec.info.update({"socket": sock, "python": self.python})
        rec.save()
        inst = LocalInstance(rec, proc)
        inst.key = key
        try:
            inst.connect(self.start_timeout).close()
        except AgentStartError as e:
            tail = inst.log_tail()
            inst.stop()
            raise AgentStartError(f"local agent failed to start: {e}\n--- agent.log (last lines) ---\n{tail}") from None
        return inst

    isolation = "none (a host process)"

    def why_not(self) -> str | None:
        try:
            self.check()
        except BackendUnavailable as e:
            return str(e)
        return None

    def describe_own(self) -> dict:
        return {"python": self.python}
