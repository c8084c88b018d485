"""The QEMU backend: a ``microvm`` restored from a snapshot, agent stream over virtio-serial.

Snapshot layout (made by ``dhvm prepare`` through ``QemuColdBoot``): the guest's RAM is a plain file (``mem``) that the
cold-boot VM mapped shared, so it *is* the memory image; the migration stream (``state``) holds
only device state because of the ``x-ignore-shared`` capability. A restore maps ``mem`` privately
(copy-on-write, read lazily from the page cache) and loads the few-KB ``state``: no 0.8 GB read,
and every clone of one snapshot shares the clean pages. This is the VM-templating trick of Kata
Containers. The ``mem`` file must never be written after the snapshot: clones use ``share=off``.

Host side of one instance (all under ``run/<id>/``, mode 0700): ``agent.sock`` (virtio-serial port
``dhg.agent``, a unix socket chardev), ``qmp.sock`` (QMP), ``agent.log`` (the guest console), and
``qemu.log`` (QEMU's own stderr). Deephaven's port is forwarded to a free 127.0.0.1 port by user
networking with ``restrict=on``: the guest cannot open outbound connections.
"""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..config import DH_VERSION, Layout
from ..errors import AgentStartError, BackendUnavailable, CheckpointError
from ..instances import destroy, new_instance
from .base import (SNAPSHOT_METADATA, RestoredInstance, check_snapshot_inputs, connect_unix, file_tail,
                   read_snapshot_metadata, require_snapshot_files)
from .host import kvm_usable
from .machine import DEFAULT_HEAP, DEFAULT_RAM_MB
from .qmp import Monitor, QMPCommandError
from .restore import Restore, SnapshotBackend
from .qemu_machine import (qemu_snapshot_meta, CHECKPOINT_BANDWIDTH, CHECKPOINT_TIMEOUT_S, QEMU_BINARY, RESTORE_TIMEOUT_S,
                           SNAPSHOT_FORMAT, TCG_CPU, TCG_JVM_OPTS, Machine, free_port,
                           qemu_binary, qemu_version)
from .qemu_memory import copy_sparse, _open_memfd
from .qemu_coldboot import QemuColdBoot

@dataclass
class Snapshot:
    """A prepared snapshot: ``mem`` (guest RAM), ``state`` (device state), ``metadata.json``."""

    dir: Path
    machine: Machine
    meta: dict = field(default_factory=dict)

    METADATA = SNAPSHOT_METADATA

    @property
    def mem(self) -> Path:
        return self.dir / "mem"

    @property
    def state(self) -> Path:
        return self.dir / "state"

    @property
    def metadata_path(self) -> Path:
        return self.dir / self.METADATA

    @classmethod
    def load(cls, directory: Path) -> "Snapshot":
        """Read a snapshot; BackendUnavailable (saying to run prepare) if it is missing or stale."""
        meta = read_snapshot_metadata(directory, "qemu", SNAPSHOT_FORMAT, "QEMU", "run: dhvm prepare")
        snap = cls(directory, Machine(**meta["machine"]), meta)
        require_snapshot_files((snap.mem, snap.state), "run: dhvm prepare")
        return snap

    def check_inputs(self, vm_dir: Path) -> None:
        """The kernel and the root disk must be the very files the snapshot was taken with."""
        check_snapshot_inputs(self.meta.get("files"), vm_dir, "run: dhvm prepare")


def _check_mem_size(snap: Snapshot) -> None:
    """A restore never writes its snapshot: QEMU extends a ``mem`` shorter than the VM's RAM (ftruncate,
    zero-filled), so one that is not exactly that size is refused before QEMU opens it."""
    want = snap.machine.ram_mb * 2**20
    have = snap.mem.stat().st_size
    if have == want:
        return
    damaged = f"{snap.dir} is damaged: mem is {have} bytes, expected {want} (the VM's {snap.machine.ram_mb} MiB of RAM)"
    if "checkpoint" in snap.meta:
        raise CheckpointError(f"{damaged}; delete it and save it again: %dhvm checkpoint {snap.dir.name} --overwrite "
                              f"(or delete it: dhvm checkpoint rm {snap.dir.name})")
    raise BackendUnavailable(f"{damaged}; run: dhvm prepare --rebuild")


class QemuInstance(RestoredInstance):
    """One restored microVM (one QEMU process) and the client made during its restore."""

    vmm_log = "qemu.log"

    def __init__(self, record, proc: subprocess.Popen, host_port: int, snapshot: Snapshot):
        super().__init__(record, proc)
        self.host_port = host_port
        self.snapshot = snapshot

    @property
    def socket_path(self) -> Path:
        return self.dir / "agent.sock"

    def connect(self, timeout: float) -> socket.socket:
        # QEMU's socket chardev serves one client at a time: a second concurrent one waits.
        return connect_unix(self.socket_path, timeout, self.alive)

    def monitor(self, timeout: float = 10.0) -> Monitor:
        """A QMP connection to this VM's QEMU (close it in the thread that opened it)."""
        return Monitor.connect(self.dir / "qmp.sock", timeout=timeout, is_alive=self.alive)

    def describe(self) -> dict:
        return {**super().describe(), "accel": self.snapshot.machine.accel, "snapshot": str(self.snapshot.dir),
                "deephaven_port": f"127.0.0.1:{self.host_port}", "pid": self.proc.pid,
                "restore_ms": self.timings.get("ready_ms")}


class QemuRestore(Restore):
    """A QEMU started with ``-incoming defer``, then driven over QMP: the device state comes from the snapshot's
    ``state`` (its RAM a private mapping of ``mem``) or, for a fork, migrated from a running VM."""

    vmm = "QEMU"

    def __init__(self, backend: "QemuBackend", qemu: str, snap: Snapshot, fork_of: QemuInstance | None,
                 resumed: Callable[[], None]):
        super().__init__(backend.layout, backend.name, snap, backend.restore_timeout)
        self.qemu = qemu
        self.fork_of = fork_of
        self.resumed = resumed
        self.qmp: Monitor | None = None
        self.sock: socket.socket | None = None

    def check(self) -> None:
        if self.fork_of is None:
            _check_mem_size(self.snap)

    def spawn(self, rec) -> QemuInstance:
        snap, fork_of = self.snap, self.fork_of
        port = free_port()
        argv = snap.machine.argv(self.layout.vm, self.qemu, None if fork_of else snap.mem, shared=False,
                                 host_port=port, incoming=True)
        with open(os.path.join(rec.dir, "qemu.log"), "wb") as qlog:
            # umask 077: the sockets QEMU makes in the run dir are 0600 (the dir itself is 0700).
            spawn_ms = self.ms()  # the VMM process starts here
            proc = subprocess.Popen(argv, cwd=rec.dir, stdin=subprocess.DEVNULL, stdout=qlog, stderr=subprocess.STDOUT,
                                    start_new_session=True, umask=0o077)
        rec.add_process(proc.pid, "qemu")
        rec.info.update({"accel": snap.machine.accel, "snapshot": str(snap.dir), "deephaven_port": port,
                         "deephaven_url": f"http://127.0.0.1:{port}/ide/",
                         **({"forked_from": fork_of.id} if fork_of else {})})
        rec.save()
        inst = QemuInstance(rec, proc, port, snap)
        inst.timings["spawn_ms"] = spawn_ms
        return inst

    def load(self, inst: QemuInstance) -> None:
        # The monitor is only needed for the restore: it is closed in this thread (see vm/qmp.py).
        self.qmp = qmp = inst.monitor(self.timeout)
        inst.timings["qmp_ms"] = self.ms()
        for name in ("agent.sock", "qmp.sock"):
            os.chmod(inst.dir / name, 0o600)  # owner only (the run dir is 0700 as well)
        qmp.execute("migrate-set-capabilities",
                    {"capabilities": [{"capability": "x-ignore-shared", "state": self.fork_of is None}]})
        # Connect before the guest runs: the port is then open at resume and the agent's pending
        # read (from the snapshot) gets our first frame at once.
        self.sock = connect_unix(inst.socket_path, self.timeout, inst.alive)
        if self.fork_of is None:
            qmp.execute("migrate-incoming", {"uri": f"exec:cat {shlex.quote(str(self.snap.state))}"})
            qmp.migrate_wait(timeout=self.timeout, poll=0.002)
        else:
            qmp.execute("migrate-incoming", {"uri": "unix:mig.sock"})
            _migrate_paused(self.fork_of, inst.dir.name)
            self.resumed()
            _wait_status(qmp, inst.proc, lambda st: st != "inmigrate", CHECKPOINT_TIMEOUT_S)

    def resume(self, inst: QemuInstance) -> socket.socket:
        # The snapshot was taken paused; the migrated run state keeps it paused until told.
        assert self.qmp is not None and self.sock is not None
        self.qmp.execute("cont")
        return self.sock

    def release(self) -> None:
        if self.qmp is not None:
            self.qmp.close()
            self.qmp = None

    def what(self) -> str:
        return f"fork of {self.fork_of.id}" if self.fork_of else super().what()

    def passthrough(self, error: Exception, tail: str) -> None:
        if "Could not set up host forwarding rule" in tail:
            raise _PortTaken(tail) from None


class QemuBackend(SnapshotBackend):
    """Restores microVMs from the snapshot that ``dhvm prepare`` made for ``dh_version``."""

    name = "qemu"

    def __init__(self, layout: Layout, dh_version: str = DH_VERSION, accel: str = "auto", qemu: str | None = None,
                 heap: str | None = None, restore_timeout: float = RESTORE_TIMEOUT_S, start_from: str | None = None,
                 **_ignored):
        super().__init__(layout, dh_version, heap, restore_timeout, start_from)
        self.accel = accel
        self.qemu = qemu

    # -- checks ------------------------------------------------------------------------------------

    def load_snapshot(self, directory: Path) -> Snapshot:
        return Snapshot.load(directory)

    def base_snapshot(self) -> Snapshot:
        """The snapshot ``dhvm prepare`` made, checked against the files it was taken with."""
        snap = Snapshot.load(self.layout.snapshots(self.dh_version))
        snap.check_inputs(self.layout.vm)
        if self.accel not in ("auto", snap.machine.accel):
            raise BackendUnavailable(f"the snapshot was made with accel={snap.machine.accel}, not {self.accel} "
                                     f"— run: dhvm prepare --accel {self.accel} --rebuild")
        if snap.machine.accel == "kvm" and not kvm_usable():
            raise BackendUnavailable("the snapshot needs KVM but /dev/kvm is not usable — run: dhvm prepare --accel tcg")
        self._snapshot = snap
        return snap

    def binary(self) -> str:
        found = self.qemu or qemu_binary()
        if not found or not os.access(found, os.X_OK):
            raise BackendUnavailable(f"{QEMU_BINARY} not found, so the qemu backend cannot run VMs here. "
                                     "Run: apt-get install qemu-system-x86")
        return found

    # -- start -------------------------------------------------------------------------------------

    def start(self, checkpoint: str | None = None) -> QemuInstance:
        """Restore a fresh VM from the snapshot (or a checkpoint); returns once the agent has taken the
        host's clock, entropy and key."""
        qemu = self.binary()
        snap = self.snapshot(checkpoint)
        last: Exception | None = None
        for _ in range(3):  # a forwarded port taken between our probe and QEMU's bind: try another
            try:
                return self._restore(qemu, snap)
            except _PortTaken as e:
                last = e
        raise AgentStartError(f"could not forward a Deephaven port: {last}")

    def _restore(self, qemu: str, snap: Snapshot, fork_of: QemuInstance | None = None,
                 resumed: Callable[[], None] = lambda: None) -> QemuInstance:
        """A new VM: from ``snap``'s files, or (``fork_of``) migrated from that running VM."""
        return QemuRestore(self, qemu, snap, fork_of, resumed).run()

    can_fork = True
    # QEMU 7.2 opens a memory-backend-file O_RDWR even with share=off (readonly=on would make the RAM a ROM).
    checkpoint_writable_files = ("mem",)

    def fork(self, parent: QemuInstance, resumed: Callable[[], None] = lambda: None) -> QemuInstance:
        """A second VM that runs on from ``parent``'s state now: ``parent`` is paused and migrated into a new
        QEMU on this host (its RAM a memfd of its own), then both run. No file is written, so this is
        quicker than a checkpoint and a restore; ``resumed`` is called once the parent runs again. The
        caller holds the parent's agent still around this, as for a checkpoint."""
        return self._restore(self.binary(), parent.snapshot, fork_of=parent, resumed=resumed)

    def checkpoint(self, instance: QemuInstance, work: Path, resumed: Callable[[], None] = lambda: None) -> dict:
        """Save the running VM's memory and device state into ``work`` as a snapshot (``mem``, ``state``).

        QEMU 7.2 cannot write a VM's memory into a file that a later restore maps (no ``mapped-ram``),
        and ``x-ignore-shared`` skips only memory that is shared, which a clone's (a private mapping of
        the base ``mem``) is not. So the VM is migrated, paused, into a second QEMU on this host whose
        memory is a *shared* memfd; that QEMU, never started, then writes only its device state, as
        ``dhvm prepare`` does, and its memory is copied into ``work/mem``: only the pages the migration
        wrote (the zero pages stay holes, so the file is as sparse as the VM's memory is empty). The
        source VM is resumed and carries on. The caller holds the agent still around this.

        Why a memfd and a copy rather than a shared mapping of ``work/mem`` itself: every first write to
        a page of a shared file mapping takes a page fault that allocates the file's block; measured
        here, 1.4 GB went in at 87 MB/s that way (16.5 s) against 2.8 s for the same migration into
        /dev/null.
        """
        qemu = self.binary()
        snap = instance.snapshot
        rec = new_instance(self.layout, "qemu-checkpoint")
        t0 = time.perf_counter()
        argv = snap.machine.argv(self.layout.vm, qemu, None, shared=True, host_port=free_port(),
                                 incoming=True) + ["-S"]
        with open(os.path.join(rec.dir, "qemu.log"), "wb") as qlog:
            dest = subprocess.Popen(argv, cwd=rec.dir, stdin=subprocess.DEVNULL, stdout=qlog, stderr=subprocess.STDOUT,
                                    start_new_session=True, umask=0o077)
        rec.add_process(dest.pid, "qemu")
        rec.save()
        try:
            with Monitor.connect(Path(rec.dir) / "qmp.sock", timeout=30, is_alive=lambda: dest.poll() is None) as dst:
                dst.execute("migrate-set-capabilities",
                            {"capabilities": [{"capability": "x-ignore-shared", "state": False}]})
                # The socket is in the new instance's 0700 run dir, named relative to the source's (a sibling).
                dst.execute("migrate-incoming", {"uri": "unix:mig.sock"})
                t_stop = time.perf_counter()
                mig = _migrate_paused(instance, Path(rec.dir).name)  # the source runs on after
                paused_s = time.perf_counter() - t_stop
                resumed()
                _wait_status(dst, dest, lambda st: st != "inmigrate", CHECKPOINT_TIMEOUT_S)
                dst.execute("migrate-set-capabilities",
                            {"capabilities": [{"capability": "x-ignore-shared", "state": True}]})
                dst.execute("migrate", {"uri": f"exec:cat > {shlex.quote(str(work / 'state'))}"})
                dst.migrate_wait(timeout=60, poll=0.005)
                t_copy = time.perf_counter()
                with _open_memfd(dest.pid) as memfd:
                    try:
                        dst.execute("quit")
                    except QMPCommandError:
                        pass  # QEMU may close the monitor before it answers
                    dest.wait(timeout=30)
                    copy_sparse(memfd, work / "mem")  # fsynced: on disk before it is declared done
                write_s = time.perf_counter() - t_copy
        except Exception as e:
            raise CheckpointError(f"QEMU could not save the VM: {type(e).__name__}: {e}\n--- the saving QEMU's log ---\n"
                                  f"{file_tail(Path(rec.dir) / 'qemu.log', 15)}") from None
        finally:
            if dest.poll() is None:
                dest.kill()
                dest.wait()
            destroy(rec)
        return qemu_snapshot_meta(
            qemu, snap.machine, snap.meta.get("files"), work, dh_version=self.dh_version, agent=snap.meta.get("agent"),
            timings={"save_s": round(time.perf_counter() - t0, 2), "paused_s": round(paused_s, 2),
                     "write_s": round(write_s, 2), "migration_bytes": (mig.get("ram") or {}).get("transferred")})

    isolation = "QEMU microvm"

    def describe_own(self) -> dict:
        return {"qemu": self.qemu or qemu_binary()}

    def describe_machine(self, machine: Machine) -> dict:
        return {"accel": machine.accel}

    def why_not(self) -> str | None:
        try:
            self.binary()
            self.snapshot()
        except BackendUnavailable as e:
            return str(e)
        return None


class _PortTaken(Exception):
    """QEMU could not bind the forwarded port (someone took it after we probed it)."""


def _wait_status(monitor: Monitor, proc: subprocess.Popen, done: Callable[[str], bool], timeout: float) -> str:
    """Poll a QEMU's run state until ``done`` says so (an incoming migration that fails ends the process)."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise QMPCommandError("migrate-incoming", f"the receiving QEMU exited ({proc.returncode})")
        state = monitor.status()
        if done(state):
            return state
        if time.monotonic() >= deadline:
            raise QMPCommandError("migrate-incoming", f"still {state} after {timeout:g}s")
        time.sleep(0.01)


def _migrate_paused(source: QemuInstance, dest_dir_name: str) -> dict:
    """Pause ``source`` and migrate all of it to the QEMU listening on ``mig.sock`` in the sibling run dir
    ``dest_dir_name``; ``source`` runs again afterwards, whatever happened. Returns the migration's stats."""
    with source.monitor() as src:
        src.execute("migrate-set-capabilities", {"capabilities": [{"capability": "x-ignore-shared", "state": False}]})
        src.execute("migrate-set-parameters", {"max-bandwidth": CHECKPOINT_BANDWIDTH})
        src.execute("stop")
        try:
            src.execute("migrate", {"uri": f"unix:../{dest_dir_name}/mig.sock"})
            return src.migrate_wait(timeout=CHECKPOINT_TIMEOUT_S, poll=0.01)
        finally:
            try:
                src.execute("cont")
            except QMPCommandError:
                pass  # the VM is gone: its session finds out at its next request


# Names other modules (prepare, cli, tests) import from here.
__all__ = ["DEFAULT_HEAP", "DEFAULT_RAM_MB", "Machine", "QemuBackend", "QemuColdBoot", "QemuInstance", "Snapshot",
           "TCG_CPU", "TCG_JVM_OPTS", "copy_sparse", "qemu_binary", "qemu_version"]
