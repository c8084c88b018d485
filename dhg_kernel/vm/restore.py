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
from . import checkpoint_store as store
from .base import Backend, RestoredInstance, new_key


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



class SnapshotBackend(Backend):
    """A backend whose VMs are restored from snapshots (the base one ``dhvm prepare`` made, or checkpoints):
    what QEMU and Firecracker share. Each says how to load and check its own snapshot (``load_snapshot``,
    ``check_checkpoint``) and which is its base (``base_snapshot``)."""

    can_checkpoint = True

    def __init__(self, layout: Layout, dh_version: str, heap: str | None, restore_timeout: float,
                 start_from: str | None):
        self.layout = layout
        self.dh_version = dh_version
        self.start_from = start_from
        """A checkpoint's name: every VM starts from it instead of the base snapshot (``Dhvm.start_from``)."""
        # The heap (and RAM) are baked into the snapshot at prepare time; a different wish is only reported.
        self.heap_requested = heap
        self.restore_timeout = restore_timeout
        self._snapshot = None

    @abstractmethod
    def load_snapshot(self, directory):
        """This backend's snapshot value read from ``directory`` (BackendUnavailable if it is not one)."""

    def check_checkpoint(self, snap) -> None:
        """Refuse a checkpoint that cannot restore here (beyond the checks every snapshot gets)."""

    def snapshot(self, checkpoint: str | None = None):
        """What a VM starts from: the checkpoint ``checkpoint`` (or ``start_from``) or the base snapshot,
        checked against the files it was taken with (and a checkpoint against the base it grew from)."""
        base = self.base_snapshot()
        name = checkpoint or self.start_from
        if not name:
            return base
        snap = store.snapshot_of(self.layout, name, self.name, base.meta, self.dh_version, self.load_snapshot)
        snap.check_inputs(self.layout.vm)
        self.check_checkpoint(snap)
        return snap

    def described_snapshot(self):
        return self._snapshot or self.snapshot()

    def checkpoint_bytes(self, instance) -> int:
        return instance.snapshot.machine.ram_mb * 2**20  # all of guest memory, at the most
