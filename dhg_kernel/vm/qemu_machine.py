"""The QEMU machine: the binary, and the command line that must be the same at the cold boot and at every
restore (``Machine.argv``)."""

from __future__ import annotations

import shutil
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .base import mem_sizes, snapshot_meta
from .machine import DEFAULT_HEAP, DEFAULT_RAM_MB, GUEST_DH_PORT, guest_cmdline, host_tsc_khz


QEMU_BINARY = "qemu-system-x86_64"
# The JVM dies under TCG with -cpu max (SIGILL) and multi-threaded TCG (SIGSEGV):
# see docs/design-facts.md, "The JVM under TCG".
TCG_CPU = "qemu64,+ssse3,+sse4.1,+sse4.2,+popcnt,+cx16"
TCG_ACCEL = "tcg,thread=single"
# Under TCG, C2 compiles cost more than they win: C1 only halves the cold boot (129 s -> 65 s) and
# the first new-formula cell after a restore (12.7 s -> 5.2 s), measured on this project's machines.
TCG_JVM_OPTS = "-XX:TieredStopAtLevel=1"
AGENT_PORT_NAME = "dhg.agent"
# QEMU names the memfd of this backend after it (/proc/PID/fd/N -> "/memfd:memory-backend-memfd (deleted)").
MEMFD_BACKEND = "memory-backend-memfd"
SNAPSHOT_FORMAT = 1
# A restore normally takes well under a second; this bounds a broken one.
RESTORE_TIMEOUT_S = 30.0
# A checkpoint copies the VM's memory once over a local socket: this bounds a stuck one.
CHECKPOINT_TIMEOUT_S = 600.0
# No cap on the checkpoint's local copy (QEMU's default, 128 MiB/s, is meant for networks).
CHECKPOINT_BANDWIDTH = 64 * 2**30


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
    def kernel_cmdline(heap: str, jvm_opts: str = "", accel: str = "tcg") -> str:
        """The guest kernel command line (see ``machine.guest_cmdline``); under TCG it names the TSC rate."""
        return guest_cmdline(heap, jvm_opts, tsc_khz=host_tsc_khz() if accel == "tcg" else None)

    def argv(self, vm_dir: Path, qemu: str, mem_path: Path | None, shared: bool, host_port: int,
             incoming: bool) -> list[str]:
        """The QEMU command line; sockets and logs are relative to the instance dir (QEMU's cwd),
        which keeps them under the 108-byte unix socket path limit whatever DHG_HOME is.
        ``mem_path`` None: the RAM is a shared memfd (see ``QemuBackend.checkpoint``)."""
        accel = TCG_ACCEL if self.accel == "tcg" else self.accel
        if mem_path is None:
            mem = f"{MEMFD_BACKEND},id=mem,size={self.ram_mb}M,share=on"
        else:
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



def qemu_snapshot_meta(qemu: str, machine: Machine, files: dict | None, work: Path, sizes: dict | None = None,
                       **extra) -> dict:
    """The metadata every QEMU snapshot records (base or checkpoint): the machine, the QEMU that made it, the
    input stamps (a checkpoint keeps its base snapshot's), the sizes of ``work``'s ``mem`` and ``state``."""
    return snapshot_meta("qemu", SNAPSHOT_FORMAT, machine, files,
                         {**mem_sizes(work / "mem"), "state_bytes": (work / "state").stat().st_size, **(sizes or {})},
                         accel=machine.accel, qemu_version=qemu_version(qemu), guest_port=GUEST_DH_PORT, **extra)
