"""One restore skeleton for every VMM: spawn → load the snapshot → resume → hand over (clock, entropy, key).

A backend subclasses ``Restore`` with its own steps (QEMU: a process with ``-incoming defer``, then QMP;
Firecracker: a process, then its API) and gets, once for all of them, the step timings, the
after-restore handshake and one error path: what failed, the guest console and the VMM's log tail,
the half-made instance cleaned up, and the fix.
"""

from __future__ import annotations

import socket
import time
from abc import ABC, abstractmethod

from ..config import Layout
from ..errors import AgentStartError
from ..instances import InstanceRecord, destroy, new_instance
from .base import RestoredInstance, new_key


class Restore(ABC):
    """A new VM from a snapshot (or a running VM); ``run`` drives the hooks in order.

    ``spawn`` starts the VMM and returns the instance; ``load`` puts the snapshot's state into it; ``resume``
    lets the guest run and returns the agent's stream (None: no agent to greet, stop there); ``ready``
    finishes after the handshake (port forwarders…); ``release`` closes what ``load`` opened, always.
    """

    vmm = "?"
    """The VMM's name in messages ("QEMU", "Firecracker")."""
    prepare_hint = "run: dhvm prepare --rebuild"
    """How to rebuild a stale base snapshot."""

    def __init__(self, layout: Layout, backend: str, snap, timeout: float):
        self.layout = layout
        self.backend = backend
        self.snap = snap
        self.timeout = timeout
        self.t0 = 0.0

    def ms(self) -> float:
        """Milliseconds since the restore began."""
        return round((time.perf_counter() - self.t0) * 1000, 1)

    # -- hooks ----------------------------------------------------------------------------------------

    def check(self) -> None:
        """Refuse a snapshot that cannot restore, before anything starts."""

    @abstractmethod
    def spawn(self, rec: InstanceRecord) -> RestoredInstance:
        """Start the VMM process for ``rec``; the instance (its ``timings["spawn_ms"]`` set)."""

    @abstractmethod
    def load(self, inst: RestoredInstance) -> None:
        """Load the snapshot's state into the new VMM."""

    @abstractmethod
    def resume(self, inst: RestoredInstance) -> socket.socket | None:
        """Let the guest run; the stream to its agent (None: stop once it runs)."""

    def ready(self, inst: RestoredInstance) -> None:
        """After the handshake: what the instance needs to serve (e.g. a port forwarder)."""

    def release(self) -> None:
        """Close the control channels ``load`` opened (on success and on failure)."""

    def what(self) -> str:
        """What is being made, for the error message."""
        return f"restore from {self.snap.dir}"

    def fix(self) -> str:
        """The command that fixes a restore that failed."""
        if "checkpoint" in self.snap.meta:
            return f"If the checkpoint is damaged, remove it: dhvm checkpoint rm {self.snap.dir.name}"
        return f"If the snapshot is stale, {self.prepare_hint}"

    def passthrough(self, error: Exception, tail: str) -> None:
        """Raise ``error`` (or another) as it is, when it already says what to do; the log tail is given."""

    # -- the skeleton ---------------------------------------------------------------------------------

    def run(self) -> RestoredInstance:
        self.t0 = time.perf_counter()
        self.check()
        rec = new_instance(self.layout, self.backend)
        inst: RestoredInstance | None = None
        try:
            try:
                inst = self.spawn(rec)
                self.load(inst)
                inst.timings["loaded_ms"] = self.ms()
                sock = self.resume(inst)
                inst.timings["resumed_ms"] = self.ms()
            finally:
                self.release()
            if sock is None:
                return inst
            inst.handshake(sock, new_key(), self.timeout)
            self.ready(inst)
            inst.timings["ready_ms"] = self.ms()
        except Exception as e:
            tail = inst.log_tail() if inst is not None else ""
            if inst is not None:
                inst.stop()
            else:
                destroy(rec)
            self.passthrough(e, tail)
            log = inst.vmm_log if inst is not None else "log"
            raise AgentStartError(f"{self.vmm} {self.what()} failed: {e}\n--- guest console / {log} ---\n"
                                  f"{tail}\n{self.fix()}") from None
        rec.info["restore_ms"] = inst.timings["ready_ms"]
        rec.save()
        return inst

