"""The Firecracker cold boot for ``dhvm prepare``: boot a guest through the API, then save it as the base
snapshot."""


import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Callable

from ..client import AgentClient
from ..config import Layout
from ..instances import new_instance
from . import netns, vsock
from .base import ColdBoot, kill_vmm
from .fc_api import FirecrackerAPI
from .machine import GUEST_DH_PORT
from .fc_calls import (AGENT_VSOCK_PORT, CONSOLE_LOG, FC_LOG, INITRD_NAME, KERNEL_NAME, MEM_NAME, ROOTFS_NAME,
                       VMSTATE_NAME, VSOCK_UDS, FcMachine, cold_boot_calls, open_api, send,
                       snapshot_calls)
from .fc_snapshot import new_snapshot_meta, snapshot_sizes, take_snapshot_files
from .fc_launcher import Launcher



class FcColdBoot(ColdBoot):
    """A VM booted from scratch through Firecracker's API for ``dhvm prepare``; ``save`` pauses it and
    writes a full snapshot. The cold boot runs unjailed (prepare is root anyway); the snapshot's
    relative paths restore in a chroot too."""

    def __init__(self, layout: Layout, launcher: "Launcher", machine: FcMachine, log: Callable[[str], None],
                 netns_parent: str | None = None, restore_jailer: str | None = None,
                 restore_jailer_user: tuple[int, int] | None = None):
        self.layout = layout
        self.restore_jailer = restore_jailer
        """The jailer every restore of this snapshot runs under (recorded in its metadata), if any."""
        self.restore_jailer_user = restore_jailer_user
        """The (uid, gid) the jailer drops to for those restores (default: the restoring user's)."""
        self.launcher = launcher
        self.machine = machine
        self.log = log
        self.netns_parent = netns_parent
        # The cold-boot VM is an instance like any other, so a killed prepare leaves nothing behind.
        self.rec = new_instance(layout, "firecracker-prepare")
        self.root = launcher.root(self.rec)
        self.proc: subprocess.Popen | None = None
        self.api: FirecrackerAPI | None = None
        self.plan: netns.NetPlan | None = None

    @property
    def console(self) -> Path:
        return Path(self.rec.dir) / CONSOLE_LOG

    @property
    def vmm_log(self) -> Path:
        return self.root / FC_LOG

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def boot(self) -> None:
        vm = self.layout.vm
        self.rec.info["cleanup"] = self.launcher.cleanup_items(self.rec)
        self.rec.save()
        if self.machine.network:
            self.plan = netns.setup(self.rec.id, self.layout.run, self.netns_parent)
            self.rec.info["cleanup"].append(self.plan.cleanup_item())
            self.rec.save()
        files = {KERNEL_NAME: vm / self.machine.kernel, ROOTFS_NAME: vm / self.machine.rootfs}
        if self.machine.initrd:
            files[INITRD_NAME] = vm / self.machine.initrd
        self.launcher.populate(self.root, files)
        self.proc = self.launcher.spawn(self.rec, self.plan)
        self.api = open_api(self.root, self.launcher.fc)
        self.api.wait_ready(is_alive=self.alive)
        send(self.api, cold_boot_calls(self.machine, self.launcher.fc.version))
        self.log("firecracker API calls:\n" + "\n".join(f"  {m} {p} {json.dumps(b)}" for m, p, b in self.api.calls))

    def connect(self, timeout: float) -> socket.socket:
        return vsock.connect(self.root / VSOCK_UDS, AGENT_VSOCK_PORT, timeout, self.alive)

    def save(self, work: Path, client: AgentClient | None) -> dict:
        """Pause, write vmstate + mem, move them into ``work`` (mem made read-only); returns the
        snapshot's Firecracker part of the metadata. ``client``: the agent's connection, if any."""
        assert self.api is not None
        if client is not None:
            # A snapshot resets every vsock connection; closing ours first leaves the agent in accept().
            client.close()
            time.sleep(0.2)
        t0 = time.monotonic()
        send(self.api, snapshot_calls(self.launcher.fc.version))
        save_s = time.monotonic() - t0
        self._stop_vmm()
        take_snapshot_files(self.root, work, {VMSTATE_NAME: VMSTATE_NAME, MEM_NAME: MEM_NAME}, shutil.move)
        for name in (VMSTATE_NAME, MEM_NAME):
            os.chmod(work / name, 0o400)  # clones map it privately; nothing may ever write it
        return new_snapshot_meta(self.launcher.fc, self.machine, self.layout.vm, guest_port=GUEST_DH_PORT,
                                 jailer=self.restore_jailer, sizes=snapshot_sizes(work),
                                 **({"jailer_user": list(self.restore_jailer_user)} if self.restore_jailer_user else {}),
                                 timings={"snapshot_s": round(save_s, 2)})

    def summary(self, meta: dict) -> str:
        return (f"memory {meta['sizes']['mem_allocated_bytes'] / 2**20:.0f} MB used of {self.machine.ram_mb} MB, "
                f"saved in {meta['timings']['snapshot_s']:.2f}s")

    def _stop_vmm(self) -> None:
        if self.api is not None:
            self.api.close()
            self.api = None
        kill_vmm(self.proc)

    def destroy(self) -> None:
        from ..instances import destroy

        self._stop_vmm()
        destroy(self.rec)

