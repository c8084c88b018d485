"""The Firecracker backend: microVMs restored from a snapshot, agent stream over hybrid vsock.

Instance root. Every path given to Firecracker is *relative* to the process's working directory,
which is the instance's own root: the run dir (``run/<id>/``) or, with the jailer, its chroot.
The root holds ``api.sock``, ``vsock.sock`` (the hybrid-vsock socket Firecracker binds),
``firecracker.log``, and links to the shared artifacts under the names the snapshot recorded
(``rootfs.ext4``, ``vmstate``, ``mem``; ``vmlinux``/``initrd.img`` at the cold boot). So a
snapshot taken in one root restores in any other: each clone binds its own ``vsock.sock`` —
on Firecracker ≥ 1.16 ``vsock_override`` says so explicitly, before that the relative path and
the per-instance working directory (or chroot) do it.

Sharing. All clones of one snapshot map the same ``mem`` file privately (Firecracker's File
memory backend: MAP_PRIVATE, copy-on-write, never written; the file is also made read-only) and
open the same root disk read-only (the guest overlays a tmpfs). Deephaven's port is forwarded to a
127.0.0.1 TCP port through hybrid vsock (``vsock.PortForwarder``); guest networking (a TAP in a
per-instance network namespace, ``netns.py``) is optional and off by default.

After a restore the host sends the agent ``restored`` with its clock and fresh entropy, exactly
as the QEMU backend does (clones start with identical random state).

Checkpoints. A running clone is paused, saved as a Full snapshot into files of its own in its root,
and resumed; the files become a checkpoint laid out like the base snapshot (``vmstate``, ``mem``,
metadata.json), restored exactly as the base is. Firecracker resets the guest's vsock connections
at every snapshot, so the saved VM's open streams end when it resumes (listeners survive).
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path
from typing import Callable

from ..config import DH_VERSION, Layout
from ..errors import BackendUnavailable, CheckpointError
from ..instances import InstanceRecord
from . import netns, vsock
from .base import RestoredInstance, read_snapshot_metadata
from .fc_api import FirecrackerAPI, FirecrackerAPIError, SpecError, Version, version_str
from .fc_release import FirecrackerBinary, FirecrackerMissing, from_path, obtain
from .host import Check, host_checks
from .machine import GUEST_DH_PORT
from .restore import Restore, SnapshotBackend
from .fc_calls import (SNAPSHOT_FORMAT, AGENT_VSOCK_PORT, CHECKPOINT_MEM_NAME, CHECKPOINT_VMSTATE_NAME, FC_LOG, MEM_NAME,
                       RESTORE_REFUSED_S, RESTORE_TIMEOUT_S, ROOT_DRIVE_ID, ROOTFS_NAME,
                       VMSTATE_NAME, VSOCK_UDS, Call, FcMachine, checkpoint_calls,
                       cold_boot_calls, open_api, restore_calls, resume_calls, send,
                       snapshot_calls)
from .fc_snapshot import FcSnapshot, new_snapshot_meta, snapshot_sizes, take_snapshot_files
from .fc_launcher import Launcher, api_check, cleanup, kernel_check
from .fc_coldboot import FcColdBoot
# -- instances ------------------------------------------------------------------------------------


class FirecrackerInstance(RestoredInstance):
    """One restored microVM: a Firecracker process, its API, the Deephaven port forwarder."""

    vmm_log = FC_LOG

    def __init__(self, record: InstanceRecord, proc: subprocess.Popen, root: Path, snapshot: FcSnapshot):
        super().__init__(record, proc)
        self.root = root
        self.snapshot = snapshot
        self.api: FirecrackerAPI | None = None
        self.forwarder: vsock.PortForwarder | None = None

    @property
    def log_dir(self) -> Path:
        return self.root

    @property
    def vsock_path(self) -> Path:
        return self.root / VSOCK_UDS

    def connect(self, timeout: float) -> socket.socket:
        return vsock.connect(self.vsock_path, AGENT_VSOCK_PORT, timeout, self.alive, refused_limit=RESTORE_REFUSED_S)

    def close_handles(self) -> None:
        if self.forwarder is not None:
            self.forwarder.close()
            self.forwarder = None
        if self.api is not None:
            self.api.close()
            self.api = None

    def describe(self) -> dict:
        return {**super().describe(), "snapshot": str(self.snapshot.dir), "pid": self.proc.pid,
                "deephaven_port": self.forwarder.address if self.forwarder else None,
                "restore_ms": self.timings.get("ready_ms")}



class FirecrackerBackend(SnapshotBackend):
    """Restores Firecracker microVMs from the snapshot ``dhvm prepare --backend firecracker`` made."""

    name = "firecracker"

    def __init__(self, layout: Layout, dh_version: str = DH_VERSION, firecracker: str | None = None,
                 jailer: str | None = None, jailer_uid: int | None = None, jailer_gid: int | None = None,
                 network: bool = False, netns_parent: str | None = None,
                 restore_timeout: float = RESTORE_TIMEOUT_S, heap: str | None = None, start_from: str | None = None, **_ignored):
        super().__init__(layout, dh_version, heap, restore_timeout, start_from)
        self.firecracker = firecracker
        self.jailer, self.jailer_uid, self.jailer_gid = jailer, jailer_uid, jailer_gid
        self.network, self.netns_parent = network, netns_parent
        self._fc: FirecrackerBinary | None = None
        self._api_check: Check | None = None

    # -- checks ------------------------------------------------------------------------------------

    def binary(self) -> FirecrackerBinary:
        """The binary to run: --firecracker, else the one that made the snapshot, else PATH/downloaded."""
        if self._fc is not None:
            return self._fc
        try:
            if self.firecracker:
                fc = from_path(self.firecracker, "explicit", self.jailer)
            else:
                made_by = self._snapshot_meta().get("firecracker")
                if made_by and os.access(made_by, os.X_OK):
                    fc = from_path(made_by, "snapshot", self.jailer)
                else:
                    fc = obtain(self.layout, jailer=self.jailer, allow_download=False)
        except FirecrackerMissing as e:
            raise BackendUnavailable(str(e)) from None
        self._fc = fc
        return fc

    def _snapshot_meta(self) -> dict:
        """The base snapshot's metadata, unchecked ({} if there is none yet): which binary and jailer made it."""
        try:
            return read_snapshot_metadata(self.layout.firecracker_snapshots(self.dh_version), self.name,
                                          SNAPSHOT_FORMAT, "Firecracker", "run: dhvm prepare --backend firecracker")
        except BackendUnavailable:
            return {}

    def load_snapshot(self, directory: Path) -> FcSnapshot:
        return FcSnapshot.load_from(directory, self.layout.vm)

    def check_checkpoint(self, snap: FcSnapshot) -> None:
        snap.check_version(self.binary().version)

    def base_snapshot(self) -> FcSnapshot:
        """The prepared snapshot, checked against its inputs, this binary's version and the options."""
        snap = FcSnapshot.load_from(self.layout.firecracker_snapshots(self.dh_version), self.layout.vm)
        snap.check_inputs(self.layout.vm)
        snap.check_version(self.binary().version)
        if self.network and not snap.machine.network:
            raise BackendUnavailable("guest networking was asked for, but the snapshot has no network device — "
                                     "run: dhvm prepare --backend firecracker --network --rebuild")
        self._snapshot = snap
        return snap

    def checks(self, run_binary: bool = False) -> list[Check]:
        """Every prerequisite, in order; ``why_not`` reports the first that fails. ``run_binary``: also start
        the binary and ask its API (``api_check``, tens of ms: for ``dhvm status``, not for every session)."""
        out = host_checks(self.layout)
        try:
            fc = self.binary()
            out.append(Check("firecracker", True, f"Firecracker {version_str(fc.version)} at {fc.path} ({fc.source})"))
            if run_binary:
                if self._api_check is None:
                    self._api_check = api_check(fc)
                out.append(self._api_check)
        except BackendUnavailable as e:
            out.append(Check("firecracker", False, str(e)))
        if self.jailer:
            j = Path(self.jailer)
            out.append(Check("jailer", j.is_file() and os.access(j, os.X_OK), f"jailer at {j}",
                             "give the release's jailer binary with --jailer PATH"))
        out.append(kernel_check(self.layout))
        if self.network:
            reason = netns.why_not()
            out.append(Check("network", reason is None, reason or "network namespaces, TAP and nft available"))
        try:
            snap = self.base_snapshot()  # a checkpoint to start from is checked when it is chosen, and at start
            out.append(Check("snapshot", True, f"{snap.dir} (Firecracker {snap.meta.get('firecracker_version')}, "
                                               f"created {snap.meta.get('created')})"))
        except BackendUnavailable as e:
            out.append(Check("snapshot", False, str(e)))
        return out

    def why_not(self) -> str | None:
        for c in self.checks():
            if not c.ok:
                return f"{c.name}: {c}"
        return None

    def launcher(self, fc: FirecrackerBinary) -> Launcher:
        """Plain, or under the jailer given here or recorded by ``dhvm prepare --jailer``, dropping to
        the uid/gid given here, else recorded by ``--jailer-user``, else the caller's."""
        meta = self._snapshot_meta()
        chosen = self.jailer or meta.get("jailer")
        jailer = Path(chosen) if chosen else None
        uid, gid = meta.get("jailer_user") or (os.geteuid(), os.getegid())
        return Launcher(fc, jailer, uid if self.jailer_uid is None else self.jailer_uid,
                        gid if self.jailer_gid is None else self.jailer_gid)

    # -- start -------------------------------------------------------------------------------------

    def start(self, checkpoint: str | None = None) -> FirecrackerInstance:
        """Restore a fresh VM from the snapshot (or a checkpoint, exactly the same way); returns once the
        agent has taken the host's clock, entropy and key."""
        fc = self.binary()
        if checkpoint or self.start_from:
            snap = self.snapshot(checkpoint)
        else:
            snap = self._snapshot or self.base_snapshot()
        return restore(self.layout, self.launcher(fc), snap, self.network, self.restore_timeout,
                       netns_parent=self.netns_parent)

    # -- checkpoints -------------------------------------------------------------------------------

    def checkpoint(self, instance: FirecrackerInstance, work: Path, resumed: Callable[[], None] = lambda: None) -> dict:
        """Save the running VM into ``work`` as a snapshot (``vmstate``, ``mem``) and let it run on.

        The VM is paused, Firecracker writes a Full snapshot into the instance root (``checkpoint_calls``)
        and the VM is resumed, always: a failed save must not stop the session. The files are then
        renamed into ``work`` (DHG_HOME is one filesystem: no copy). The clone's own ``mem`` maps the
        base snapshot privately, so the new ``mem`` holds every page of the guest and a restore from it
        is the base's restore, unchanged.

        Firecracker tells the guest's vsock driver to drop its connections at every snapshot (so clones
        start clean; listening sockets survive): once resumed, the saved VM's open agent and Deephaven
        streams are reset, and the caller must connect again."""
        fc = self.binary()
        root = instance.root
        if instance.api is None:
            instance.api = open_api(root, fc)
        api = instance.api
        for name in (CHECKPOINT_VMSTATE_NAME, CHECKPOINT_MEM_NAME):
            (root / name).unlink(missing_ok=True)  # a failed earlier save's
        t0 = time.perf_counter()
        failed: Exception | None = None
        try:
            send(api, checkpoint_calls(fc.version))
        except (FirecrackerAPIError, SpecError) as e:
            failed = e
        finally:
            stuck = _resume(api, fc.version)
            paused_s = time.perf_counter() - t0
        if stuck is None:
            resumed()
        try:
            if failed is None and stuck is None:
                take_snapshot_files(root, work, {CHECKPOINT_VMSTATE_NAME: VMSTATE_NAME, CHECKPOINT_MEM_NAME: MEM_NAME})
        except OSError as e:
            raise CheckpointError(f"the checkpoint's files could not be moved from {root} into {work}: {e}. "
                                  "DHG_HOME must be one filesystem with room for the VM's memory") from None
        finally:
            for name in (CHECKPOINT_VMSTATE_NAME, CHECKPOINT_MEM_NAME):
                (root / name).unlink(missing_ok=True)  # a partial memory file can be GBs
        if failed is not None or stuck is not None:
            raise CheckpointError(_checkpoint_failure(failed, stuck, instance))
        snap = instance.snapshot
        return new_snapshot_meta(
            fc, snap.machine, self.layout.vm, files=snap.meta.get("files"), guest_port=GUEST_DH_PORT,
            jailer=snap.meta.get("jailer"), dh_version=self.dh_version, agent=snap.meta.get("agent"),
            **({"jailer_user": snap.meta["jailer_user"]} if snap.meta.get("jailer_user") else {}),
            sizes=snapshot_sizes(work),
            timings={"save_s": round(time.perf_counter() - t0, 2), "paused_s": round(paused_s, 2)})

    isolation = "Firecracker microVM (KVM)"

    def describe_own(self) -> dict:
        out = {"checks": {c.name: ("ok: " if c.ok else "FAILED: ") + str(c) for c in self.checks(run_binary=True)}}
        if self._fc:
            out.update(self._fc.describe())
        return out

    def described_snapshot(self) -> FcSnapshot | None:
        return self._snapshot  # checked by checks() above; its failure is among them

    def describe_machine(self, machine: FcMachine) -> dict:
        return {"vcpus": machine.vcpus, "network": machine.network}


def _resume(api: FirecrackerAPI, version: Version) -> Exception | None:
    """Resume a VM that a checkpoint paused; the error if Firecracker did not (it is reported, not raised,
    so that it never hides why the save itself failed)."""
    try:
        send(api, resume_calls(version))
    except (FirecrackerAPIError, SpecError) as e:
        return e
    return None


def _checkpoint_failure(failed: Exception | None, stuck: Exception | None, instance: FirecrackerInstance) -> str:
    """Why a checkpoint failed, in Firecracker's own words, and what became of the VM."""
    def said(e: Exception) -> str:
        if isinstance(e, FirecrackerAPIError):
            return f"{e.method} {e.path}: {e.fault}"
        return str(e)

    if failed is not None:
        msg = f"Firecracker could not save the VM ({said(failed)})"
        msg += (f", and did not resume it ({said(stuck)})" if stuck is not None else "; the VM runs on. Check the "
                "free space and permissions under DHG_HOME, then try again")
    else:
        msg = f"Firecracker saved the VM but did not resume it ({said(stuck)}); the checkpoint was not kept"
    if stuck is not None:
        msg += ". The session's server is stuck paused: restart the kernel to get a fresh one"
    return f"{msg}\n--- guest console / {FC_LOG} ---\n{instance.log_tail(10)}"


class FcRestore(Restore):
    """A Firecracker process (plain or jailed, in a network namespace if asked) given the snapshot's files in
    its root and told over its API to load them and resume; the agent is then reached over hybrid vsock
    and Deephaven's port forwarded."""

    vmm = "Firecracker"
    prepare_hint = "run: dhvm prepare --backend firecracker --rebuild"

    def __init__(self, layout: Layout, launcher: Launcher, snap: FcSnapshot, network: bool, timeout: float,
                 netns_parent: str | None, agent: bool):
        super().__init__(layout, FirecrackerBackend.name, snap, timeout)
        self.launcher = launcher
        self.network = network
        self.netns_parent = netns_parent
        self.agent = agent

    def spawn(self, rec: InstanceRecord) -> FirecrackerInstance:
        launcher, snap = self.launcher, self.snap
        rec.info["cleanup"] = launcher.cleanup_items(rec)
        rec.save()
        plan = None
        if self.network:
            plan = netns.setup(rec.id, self.layout.run, self.netns_parent)
            rec.info["cleanup"].append(plan.cleanup_item())
            rec.info["network"] = {"netns": plan.netns, "guest_ip": netns.GUEST_IP}
            rec.save()
        root = launcher.root(rec)
        launcher.populate(root, {VMSTATE_NAME: snap.vmstate, MEM_NAME: snap.mem, ROOTFS_NAME: snap.disks[ROOT_DRIVE_ID]})
        spawn_ms = self.ms()  # the VMM process (or its jailer) starts here
        inst = FirecrackerInstance(rec, launcher.spawn(rec, plan), root, snap)
        inst.timings["spawn_ms"] = spawn_ms
        return inst

    def load(self, inst: FirecrackerInstance) -> None:
        inst.api = open_api(inst.root, self.launcher.fc)
        inst.api.wait_ready(is_alive=inst.alive)
        inst.timings["api_ms"] = self.ms()
        send(inst.api, restore_calls(self.launcher.fc.version, self.network))  # resume_vm: it runs once loaded

    def resume(self, inst: FirecrackerInstance) -> socket.socket | None:
        if not self.agent:
            return None
        return vsock.connect(inst.vsock_path, AGENT_VSOCK_PORT, self.timeout, inst.alive,
                             refused_limit=RESTORE_REFUSED_S)

    def ready(self, inst: FirecrackerInstance) -> None:
        inst.forwarder = vsock.PortForwarder(inst.vsock_path, GUEST_DH_PORT)
        port = inst.forwarder.port
        inst.record.info.update({"snapshot": str(self.snap.dir), "deephaven_port": port,
                                 "firecracker_version": version_str(self.launcher.fc.version),
                                 "deephaven_url": f"http://127.0.0.1:{port}/ide/"})

    def passthrough(self, error: Exception, tail: str) -> None:
        if isinstance(error, (BackendUnavailable, netns.NetworkSetupError)):
            raise error


def restore(layout: Layout, launcher: Launcher, snap: FcSnapshot, network: bool = False,
            timeout: float = RESTORE_TIMEOUT_S, netns_parent: str | None = None, agent: bool = True) -> FirecrackerInstance:
    """One clone of ``snap`` in a run dir of its own: spawn, load, hand over clock and entropy, forward DH.
    ``agent=False`` stops once the VM is loaded and resumed (for guests without our agent: the tests'
    and the bench's minimal guest)."""
    return FcRestore(layout, launcher, snap, network, timeout, netns_parent, agent).run()


__all__ = ["AGENT_VSOCK_PORT", "Call", "Check", "FcColdBoot", "FcMachine", "FcSnapshot", "FirecrackerBackend",
           "FirecrackerInstance", "Launcher", "checkpoint_calls", "cold_boot_calls", "restore", "restore_calls",
           "resume_calls", "snapshot_calls", "FirecrackerAPIError", "SpecError", "send", "new_snapshot_meta", "api_check",
           "cleanup", "MEM_NAME", "VMSTATE_NAME", "CHECKPOINT_MEM_NAME"]
