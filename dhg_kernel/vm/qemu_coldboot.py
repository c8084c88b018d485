"""The QEMU cold boot for ``dhvm prepare``: a VM booted from scratch, its RAM a shared file that becomes the
snapshot's ``mem``."""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import time
from pathlib import Path
from typing import Callable

from ..client import AgentClient
from ..config import Layout
from ..instances import destroy, new_instance
from .base import ColdBoot, connect_unix, file_stamp, kill_vmm
from .qmp import Monitor, QMPCommandError
from .qemu_machine import qemu_snapshot_meta, Machine, free_port


class QemuColdBoot(ColdBoot):
    """A VM booted from scratch for ``dhvm prepare``, its RAM in a shared file that becomes the snapshot's
    ``mem``; ``save`` pauses it and migrates only the device state (``x-ignore-shared``) into ``state``.

    The cold-boot VM is an instance like any other, so a killed prepare leaves no QEMU behind.
    """

    def __init__(self, layout: Layout, qemu: str, machine: Machine, work: Path, log: Callable[[str], None]):
        self.layout = layout
        self.qemu = qemu
        self.machine = machine
        self.work = work
        self.log = log
        self.rec = new_instance(layout, "qemu-prepare")
        self.proc: subprocess.Popen | None = None
        self.monitor: Monitor | None = None

    @property
    def run_dir(self) -> Path:
        return Path(self.rec.dir)

    @property
    def console(self) -> Path:
        return self.run_dir / "agent.log"

    @property
    def vmm_log(self) -> Path:
        return self.run_dir / "qemu.log"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def boot(self) -> None:
        argv = self.machine.argv(self.layout.vm, self.qemu, self.work / "mem", shared=True, host_port=free_port(),
                                 incoming=False)
        self.log("$ " + " ".join(argv))
        with open(self.vmm_log, "wb") as qlog:
            self.proc = subprocess.Popen(argv, cwd=self.run_dir, stdin=subprocess.DEVNULL, stdout=qlog,
                                         stderr=subprocess.STDOUT, start_new_session=True, umask=0o077)
        self.rec.add_process(self.proc.pid, "qemu")
        self.monitor = Monitor.connect(self.run_dir / "qmp.sock", timeout=30, is_alive=self.alive)

    def connect(self, timeout: float) -> socket.socket:
        return connect_unix(self.run_dir / "agent.sock", timeout, self.alive)

    def save(self, work: Path, client: AgentClient) -> dict:
        """Pause, write the device state; the RAM file is already in ``work``. Returns the snapshot's
        QEMU part of the metadata.

        The agent stream stays open across the snapshot: the restored agent then sits in a read on a
        connected port, and a clone's first frame reaches it without a reconnect."""
        assert self.monitor is not None and self.proc is not None
        t0 = time.monotonic()
        state = work / "state"
        self.monitor.execute("stop")
        self.monitor.execute("migrate-set-capabilities",
                             {"capabilities": [{"capability": "x-ignore-shared", "state": True}]})
        self.monitor.execute("migrate", {"uri": f"exec:cat > {shlex.quote(str(state))}"})
        mig = self.monitor.migrate_wait(timeout=300)
        save_s = time.monotonic() - t0
        try:
            self.monitor.execute("quit")
        except QMPCommandError:
            pass  # QEMU may close the monitor before it answers
        self.monitor.close()
        self.monitor = None
        self.proc.wait(timeout=30)
        mem = work / "mem"
        with open(mem, "rb+") as fh:
            os.fsync(fh.fileno())  # the memory image must be on disk before it is declared done
        vm, m = self.layout.vm, self.machine
        files = {m.kernel: file_stamp(vm / m.kernel), m.rootfs: file_stamp(vm / m.rootfs),
                 **({m.initrd: file_stamp(vm / m.initrd)} if m.initrd else {})}
        return qemu_snapshot_meta(self.qemu, m, files, work,
                                  {"rootfs_bytes": (vm / m.rootfs).stat().st_size,
                                   "rootfs_allocated_bytes": (vm / m.rootfs).stat().st_blocks * 512},
                                  timings={"snapshot_s": round(save_s, 2),
                                           "migration_bytes": (mig.get("ram") or {}).get("transferred")})

    def summary(self, meta: dict) -> str:
        sizes = meta["sizes"]
        return (f"memory {sizes['mem_allocated_bytes'] / 2**20:.0f} MB used of {self.machine.ram_mb} MB, device "
                f"state {sizes['state_bytes'] / 1024:.0f} KB, saved in {meta['timings']['snapshot_s']:.2f}s")

    def destroy(self) -> None:
        if self.monitor is not None:
            self.monitor.close()
            self.monitor = None
        kill_vmm(self.proc)
        destroy(self.rec)

