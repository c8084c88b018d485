"""The QEMU backend: a ``microvm`` restored from a snapshot, agent stream over virtio-serial.

Snapshot layout (made by ``image.prepare``): the guest's RAM is a plain file (``mem``) that the
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
import shutil
import socket
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..config import DH_VERSION, Layout
from ..instances import new_instance
from ..qmp import QMPClient
from .base import (AgentStartError, Backend, BackendUnavailable, RestoredInstance, check_snapshot_inputs, connect_unix,
                   read_snapshot_metadata, require_snapshot_files, new_key, restored_handshake, write_snapshot_metadata, SNAPSHOT_METADATA)

QEMU_BINARY = "qemu-system-x86_64"
# The JVM dies under TCG with -cpu max (SIGILL) and multi-threaded TCG (SIGSEGV): see DESIGN.md.
TCG_CPU = "qemu64,+ssse3,+sse4.1,+sse4.2,+popcnt,+cx16"
TCG_ACCEL = "tcg,thread=single"
DEFAULT_RAM_MB = 2560
DEFAULT_HEAP = "1536m"
# Under TCG, C2 compiles cost more than they win: C1 only halves the cold boot (129 s -> 65 s) and
# the first new-formula cell after a restore (12.7 s -> 5.2 s), measured on this project's machines.
TCG_JVM_OPTS = "-XX:TieredStopAtLevel=1"
GUEST_DH_PORT = 10000
AGENT_PORT_NAME = "dhg.agent"
SNAPSHOT_FORMAT = 1
# A restore normally takes well under a second; this bounds a broken one.
RESTORE_TIMEOUT_S = 30.0


def qemu_binary() -> str | None:
    """Path of qemu-system-x86_64, or None."""
    return shutil.which(QEMU_BINARY)


def qemu_version(binary: str) -> str:
    """``QEMU emulator version …`` first line, e.g. ``7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)``."""
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10).stdout
    first = out.splitlines()[0] if out else ""
    return first.replace("QEMU emulator version ", "").strip()


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1 (QEMU binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Machine:
    """Everything about the VM that must be identical at the cold boot and at every restore.

    Paths are relative to ``DHG_HOME/vm`` so a moved DHG_HOME (a persistent mount) still works.
    """

    kernel: str
    initrd: str | None
    rootfs: str
    ram_mb: int = DEFAULT_RAM_MB
    heap: str = DEFAULT_HEAP
    accel: str = "tcg"  # "tcg" or "kvm"
    cpu: str = TCG_CPU
    smp: int = 1
    append: str = ""

    @staticmethod
    def kernel_cmdline(heap: str, jvm_opts: str = "") -> str:
        """The guest kernel command line: our init as PID 1 on a read-only root, settings as dhg.*."""
        # tsc=reliable: without it the kernel's clocksource watchdog (checking against jiffies, which lose
        # ticks under emulation) leaves only jiffies, and the guest clock falls behind whenever the host is busy.
        words = ["console=ttyS0", "root=/dev/vda", "ro", "rootfstype=ext4", "init=/opt/dhg/init", "panic=-1",
                 "quiet", "loglevel=4", "tsc=reliable", f"dhg.heap={heap}", f"dhg.dhport={GUEST_DH_PORT}"]
        if jvm_opts.strip():
            words.append("dhg.jvm=" + ",".join(jvm_opts.split()))  # init turns the commas back into spaces
        return " ".join(words)

    def argv(self, vm_dir: Path, qemu: str, mem_path: Path, shared: bool, host_port: int,
             incoming: bool) -> list[str]:
        """The QEMU command line; sockets and logs are relative to the instance dir (QEMU's cwd),
        which keeps them under the 108-byte unix socket path limit whatever DHG_HOME is."""
        accel = TCG_ACCEL if self.accel == "tcg" else self.accel
        mem = f"memory-backend-file,id=mem,size={self.ram_mb}M,mem-path={_qopt(mem_path)}," \
              f"share={'on' if shared else 'off'}"
        argv = [
            qemu, "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
            "-machine", "microvm,acpi=on,rtc=on,pit=on,pic=on,isa-serial=on,memory-backend=mem",
            "-accel", accel, "-cpu", self.cpu, "-smp", str(self.smp), "-m", f"{self.ram_mb}M",
            "-object", mem,
            "-kernel", str(vm_dir / self.kernel), "-append", self.append,
            # One read-only root disk for every instance; writes go to the guest's tmpfs overlay.
            "-drive", f"file={_qopt(vm_dir / self.rootfs)},format=raw,if=none,id=root,readonly=on",
            "-device", "virtio-blk-device,drive=root",
            # User networking only for the port forward; restrict=on cuts the guest off from the outside.
            "-netdev", f"user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:{host_port}-:{GUEST_DH_PORT}",
            "-device", "virtio-net-device,netdev=n0",
            "-device", "virtio-rng-device",
            "-device", "virtio-serial-device",
            "-chardev", "socket,id=agent,path=agent.sock,server=on,wait=off",
            "-device", f"virtserialport,chardev=agent,name={AGENT_PORT_NAME}",
            "-chardev", "file,id=con,path=agent.log,append=on", "-serial", "chardev:con",
            "-qmp", "unix:qmp.sock,server=on,wait=off",
        ]
        if self.initrd:
            argv[argv.index("-append"):argv.index("-append")] = ["-initrd", str(vm_dir / self.initrd)]
        if incoming:
            argv += ["-incoming", "defer"]
        return argv


def _qopt(path: Path | str) -> str:
    """A path inside a QEMU ``key=value,…`` option (commas are doubled)."""
    return str(path).replace(",", ",,")


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

    def save(self) -> None:
        """Write metadata.json last (atomically): its presence marks a complete snapshot."""
        write_snapshot_metadata(self.dir, {**self.meta, "format": SNAPSHOT_FORMAT, "machine": asdict(self.machine)})

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


class QemuInstance(RestoredInstance):
    """One restored microVM (one QEMU process) and the connection made during its restore."""

    vmm_log = "qemu.log"

    def __init__(self, record, proc: subprocess.Popen, host_port: int, snapshot: Snapshot):
        super().__init__(record, proc)
        self.host_port = host_port
        self.snapshot = snapshot
        self.qmp: QMPClient | None = None

    @property
    def socket_path(self) -> Path:
        return self.dir / "agent.sock"

    def reconnect(self, timeout: float) -> socket.socket:
        # QEMU's socket chardev serves one client at a time: a second concurrent one waits.
        return connect_unix(self.socket_path, timeout, self.alive)

    def close_handles(self) -> None:
        if self.qmp is not None:
            self.qmp.close()
            self.qmp = None

    def describe(self) -> dict:
        return {**super().describe(), "accel": self.snapshot.machine.accel, "snapshot": str(self.snapshot.dir),
                "deephaven_port": f"127.0.0.1:{self.host_port}", "pid": self.proc.pid,
                "restore_ms": self.timings.get("ready_ms")}


class QemuBackend(Backend):
    """Restores microVMs from the snapshot that ``dhvm prepare`` made for ``dh_version``."""

    name = "qemu"

    def __init__(self, layout: Layout, dh_version: str = DH_VERSION, accel: str = "auto", qemu: str | None = None,
                 heap: str | None = None, restore_timeout: float = RESTORE_TIMEOUT_S, **_ignored):
        self.layout = layout
        self.dh_version = dh_version
        self.accel = accel
        self.qemu = qemu
        # The heap (and RAM) are baked into the snapshot at prepare time; a different wish is only reported.
        self.heap_requested = heap
        self.restore_timeout = restore_timeout
        self._snapshot: Snapshot | None = None

    # -- checks ------------------------------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        """The prepared snapshot, checked against the files it was taken with."""
        snap = Snapshot.load(self.layout.snapshots(self.dh_version))
        snap.check_inputs(self.layout.vm)
        if self.accel not in ("auto", snap.machine.accel):
            raise BackendUnavailable(f"the snapshot was made with accel={snap.machine.accel}, not {self.accel} "
                                     f"— run: dhvm prepare --accel {self.accel} --rebuild")
        if snap.machine.accel == "kvm" and not os.access("/dev/kvm", os.R_OK | os.W_OK):
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

    def start(self) -> QemuInstance:
        """Restore a fresh VM from the snapshot; returns once the agent has taken the host's clock."""
        qemu = self.binary()
        snap = self.snapshot()
        last: Exception | None = None
        for _ in range(3):  # a forwarded port taken between our probe and QEMU's bind: try another
            try:
                return self._restore(qemu, snap)
            except _PortTaken as e:
                last = e
        raise AgentStartError(f"could not forward a Deephaven port: {last}")

    def _restore(self, qemu: str, snap: Snapshot) -> QemuInstance:
        t0 = time.perf_counter()
        rec = new_instance(self.layout, self.name)
        port = free_port()
        argv = snap.machine.argv(self.layout.vm, qemu, snap.mem, shared=False, host_port=port, incoming=True)
        with open(os.path.join(rec.dir, "qemu.log"), "wb") as qlog:
            # umask 077: the sockets QEMU makes in the run dir are 0600 (the dir itself is 0700).
            proc = subprocess.Popen(argv, cwd=rec.dir, stdin=subprocess.DEVNULL, stdout=qlog, stderr=subprocess.STDOUT,
                                    start_new_session=True, umask=0o077)
        rec.add_process(proc.pid, "qemu")
        rec.info.update({"accel": snap.machine.accel, "snapshot": str(snap.dir), "deephaven_port": port,
                         "deephaven_url": f"http://127.0.0.1:{port}/ide/"})
        rec.save()
        inst = QemuInstance(rec, proc, port, snap)
        try:
            inst.qmp = QMPClient.connect(inst.dir / "qmp.sock", timeout=self.restore_timeout, is_alive=inst.alive)
            inst.timings["qmp_ms"] = _ms(t0)
            for name in ("agent.sock", "qmp.sock"):
                os.chmod(inst.dir / name, 0o600)  # owner only (the run dir is 0700 as well)
            inst.qmp.execute("migrate-set-capabilities",
                             {"capabilities": [{"capability": "x-ignore-shared", "state": True}]})
            # Connect before the guest runs: the port is then open at resume and the agent's pending
            # read (from the snapshot) gets our first frame at once.
            inst._pending = connect_unix(inst.socket_path, self.restore_timeout, inst.alive)
            inst.qmp.execute("migrate-incoming", {"uri": f"exec:cat {shlex.quote(str(snap.state))}"})
            inst.qmp.migrate_wait(timeout=self.restore_timeout, poll=0.002)
            inst.timings["loaded_ms"] = _ms(t0)
            # The snapshot was taken paused; the migrated run state keeps it paused until told.
            inst.qmp.execute("cont")
            inst.timings["resumed_ms"] = _ms(t0)
            assert inst._pending is not None
            inst.key = new_key()
            inst.restored_info = restored_handshake(inst._pending, self.restore_timeout, inst.alive, inst.key)
            inst.timings["ready_ms"] = _ms(t0)
        except Exception as e:
            tail = inst.log_tail()
            inst.stop()
            if "Could not set up host forwarding rule" in tail:
                raise _PortTaken(tail) from None
            raise AgentStartError(f"QEMU restore from {snap.dir} failed: {e}\n--- guest console / qemu.log ---\n"
                                  f"{tail}\nIf the snapshot is stale, run: dhvm prepare --rebuild") from None
        rec.info["restore_ms"] = inst.timings["ready_ms"]
        rec.save()
        return inst

    def describe(self) -> dict:
        out: dict = {"backend": self.name, "isolation": "QEMU microvm", "qemu": self.qemu or qemu_binary()}
        try:
            snap = self._snapshot or self.snapshot()
            out.update({"accel": snap.machine.accel, "snapshot": str(snap.dir), "ram_mb": snap.machine.ram_mb,
                        "heap": snap.machine.heap, "snapshot_created": snap.meta.get("created")})
        except BackendUnavailable as e:
            out["snapshot_error"] = str(e)
        if self.heap_requested and self.heap_requested != out.get("heap"):
            out["note"] = f"heap {self.heap_requested} requested, but the snapshot's JVM has {out.get('heap')}"
        return out


class _PortTaken(Exception):
    """QEMU could not bind the forwarded port (someone took it after we probed it)."""


def _ms(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1000, 1)
