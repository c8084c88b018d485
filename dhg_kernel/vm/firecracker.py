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

import datetime as _dt
import glob
import json
import os
import shutil
import socket
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from ..client import AgentClient
from ..config import DH_VERSION, Layout
from ..errors import AgentStartError, BackendUnavailable, CheckpointError
from ..instances import InstanceRecord, new_instance
from . import checkpoint_store as store, netns, vsock
from .base import (SNAPSHOT_METADATA, Backend, ColdBoot, RestoredInstance, check_snapshot_inputs, file_stamp,
                   new_key, read_snapshot_metadata, require_snapshot_files)
from .fc_api import (FirecrackerAPI, FirecrackerAPIError, Spec, SpecError, Version, parse_version, spec_beside,
                     supports, version_str)
from .fc_release import FirecrackerBinary, FirecrackerMissing, from_path, obtain
from .host import Check, host_checks
from .machine import DEFAULT_HEAP, DEFAULT_RAM_MB, GUEST_DH_PORT, guest_cmdline

# The guest agent's AF_VSOCK port. guest/init passes it to the agent (from dhg.vsock_port on the
# kernel command line, which the boot args below set); init's own fallback must equal it.
AGENT_VSOCK_PORT = 52
GUEST_CID = 3
DEFAULT_VCPUS = 2
# Names inside an instance root (relative paths: see the module docstring).
API_SOCK = "api.sock"
VSOCK_UDS = "vsock.sock"
FC_LOG = "firecracker.log"
CONSOLE_LOG = "agent.log"
KERNEL_NAME = "vmlinux"
INITRD_NAME = "initrd.img"
ROOTFS_NAME = "rootfs.ext4"
VMSTATE_NAME = "vmstate"
MEM_NAME = "mem"
# Where a checkpoint is written inside a running clone's root: not VMSTATE_NAME/MEM_NAME, which there
# are links to the snapshot the clone was restored from (written through, they would wreck it).
CHECKPOINT_VMSTATE_NAME = "checkpoint.vmstate"
CHECKPOINT_MEM_NAME = "checkpoint.mem"
ROOT_DRIVE_ID = "rootfs"
IFACE_ID = "eth0"
SNAPSHOT_FORMAT = 1
# A restore is a few hundred ms on KVM; this bounds a broken one.
RESTORE_TIMEOUT_S = 30.0
# The snapshot was taken with the agent listening, so a restored guest that refuses its vsock port
# this long has no agent: give up then (vsock.connect) rather than at RESTORE_TIMEOUT_S.
RESTORE_REFUSED_S = 3.0


# -- the machine and the request bodies -----------------------------------------------------------


@dataclass
class FcMachine:
    """What must be identical at the cold boot and every restore (paths relative to DHG_HOME/vm)."""

    kernel: str
    initrd: str | None
    rootfs: str
    ram_mb: int = DEFAULT_RAM_MB
    vcpus: int = DEFAULT_VCPUS
    heap: str = DEFAULT_HEAP
    boot_args: str = ""
    network: bool = False

    @staticmethod
    def kernel_cmdline(heap: str, jvm_opts: str = "", network: bool = False) -> str:
        """Every guest's command line plus what makes init use vsock (and the TAP, if any)."""
        words = [guest_cmdline(heap, jvm_opts), "reboot=k", "pci=off", "i8042.noaux",
                 "dhg.transport=vsock", f"dhg.vsock_port={AGENT_VSOCK_PORT}"]
        if network:
            words += [f"dhg.ip={netns.GUEST_IP}/{netns.TAP_PREFIX}", f"dhg.gw={netns.TAP_HOST_IP}"]
        return " ".join(words)


@dataclass(frozen=True)
class Call:
    """One API request: method, path, the spec definition its body must match, and the body."""

    method: str
    path: str
    definition: str | None
    body: dict | None


def cold_boot_calls(machine: FcMachine, version: Version) -> list[Call]:
    """Configure a fresh Firecracker for the cold boot and start the guest."""
    calls = [
        Call("PUT", "/logger", "Logger", {"log_path": FC_LOG, "level": "Warning", "show_level": True}),
        Call("PUT", "/machine-config", "MachineConfiguration",
             {"vcpu_count": machine.vcpus, "mem_size_mib": machine.ram_mb, "smt": False}),
        Call("PUT", "/boot-source", "BootSource",
             {"kernel_image_path": KERNEL_NAME, "boot_args": machine.boot_args,
              **({"initrd_path": INITRD_NAME} if machine.initrd else {})}),
        # One read-only root disk for every clone; the guest's writes go to its tmpfs overlay.
        Call("PUT", f"/drives/{ROOT_DRIVE_ID}", "Drive",
             {"drive_id": ROOT_DRIVE_ID, "path_on_host": ROOTFS_NAME, "is_root_device": True, "is_read_only": True}),
        Call("PUT", "/vsock", "Vsock", {"guest_cid": GUEST_CID, "uds_path": VSOCK_UDS}),
        Call("PUT", "/entropy", "EntropyDevice", {}),
    ]
    if machine.network:
        calls.append(Call("PUT", f"/network-interfaces/{IFACE_ID}", "NetworkInterface",
                          {"iface_id": IFACE_ID, "host_dev_name": netns.TAP_NAME, "guest_mac": netns.GUEST_MAC}))
    calls.append(Call("PUT", "/actions", "InstanceActionInfo", {"action_type": "InstanceStart"}))
    return calls


def snapshot_calls(version: Version, vmstate: str = VMSTATE_NAME, mem: str = MEM_NAME) -> list[Call]:
    """Pause the guest and write a full snapshot (device state + all of guest memory) into the root."""
    return [Call("PATCH", "/vm", "Vm", {"state": "Paused"}),
            Call("PUT", "/snapshot/create", "SnapshotCreateParams",
                 {"snapshot_type": "Full", "snapshot_path": vmstate, "mem_file_path": mem})]


def checkpoint_calls(version: Version) -> list[Call]:
    """Pause a running clone and write a full snapshot of it into files of its own (see
    CHECKPOINT_MEM_NAME); ``resume_calls`` must follow, whatever happened.

    Full, not Diff: a Diff snapshot holds only the pages written since the load, so every restore of the
    base would have to track dirty pages (``track_dirty_pages``, 1.13+, a slower guest), and the pages
    would have to be merged onto a copy of the base ``mem`` — which writes as much as a Full snapshot."""
    return snapshot_calls(version, CHECKPOINT_VMSTATE_NAME, CHECKPOINT_MEM_NAME)


def resume_calls(version: Version) -> list[Call]:
    """Let a paused guest run on (after a checkpoint, written or not: resuming a running one is a no-op)."""
    return [Call("PATCH", "/vm", "Vm", {"state": "Resumed"})]


def restore_calls(version: Version, network: bool) -> list[Call]:
    """Load a snapshot into a fresh Firecracker and resume it; newer fields only where known."""
    load: dict = {"snapshot_path": VMSTATE_NAME, "mem_backend": {"backend_type": "File", "backend_path": MEM_NAME},
                  "resume_vm": True}
    if supports(version, "SnapshotLoadParams", "vsock_override"):
        load["vsock_override"] = {"uds_path": VSOCK_UDS}
    if supports(version, "SnapshotLoadParams", "clock_realtime"):
        load["clock_realtime"] = True  # kvmclock catches up with the wall clock; the agent then sets it exactly
    if network and supports(version, "SnapshotLoadParams", "network_overrides"):
        load["network_overrides"] = [{"iface_id": IFACE_ID, "host_dev_name": netns.TAP_NAME}]
    return [Call("PUT", "/logger", "Logger", {"log_path": FC_LOG, "level": "Warning", "show_level": True}),
            Call("PUT", "/snapshot/load", "SnapshotLoadParams", load)]


def send(api: FirecrackerAPI, calls: list[Call]) -> None:
    """Send calls in order (each validated by the client before it leaves)."""
    for c in calls:
        if c.definition and c.body is not None:
            api.check(c.definition, c.body)
        api.request(c.method, c.path, c.body)


def open_api(root: Path, fc: FirecrackerBinary) -> FirecrackerAPI:
    """A client for the Firecracker process serving ``root``, validating against its release's spec."""
    return FirecrackerAPI(root / API_SOCK, fc.version, load_spec(fc))


def load_spec(fc: FirecrackerBinary) -> Spec | None:
    """The release's own spec beside the binary (if kept), narrowed to the binary's version."""
    import importlib.util

    path = fc.spec or spec_beside(fc.path) or os.environ.get("DHG_FIRECRACKER_SPEC")
    if not path or not Path(path).is_file():
        return None
    if importlib.util.find_spec("jsonschema") is None or importlib.util.find_spec("yaml") is None:
        return None  # validation needs both; the version gate (FIELD_SINCE) still applies without them
    return Spec.load(path).for_version(fc.version)


# -- the snapshot ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class FcSnapshot:
    """A Firecracker snapshot as a value: device state, guest memory, the disks it expects, metadata."""

    vmstate: Path
    mem: Path
    disks: dict[str, Path]
    meta: dict = field(default_factory=dict, compare=False)

    METADATA = SNAPSHOT_METADATA

    @property
    def dir(self) -> Path:
        return self.vmstate.parent

    @property
    def machine(self) -> FcMachine:
        return FcMachine(**self.meta["machine"])

    @property
    def firecracker_version(self) -> Version:
        return parse_version(self.meta["firecracker_version"])

    @classmethod
    def load_from(cls, directory: Path, vm_dir: Path) -> "FcSnapshot":
        """Read a snapshot; BackendUnavailable (saying to run prepare) if it is missing or stale."""
        hint = "run: dhvm prepare --backend firecracker"
        meta = read_snapshot_metadata(directory, "firecracker", SNAPSHOT_FORMAT, "Firecracker", hint)
        snap = cls(directory / VMSTATE_NAME, directory / MEM_NAME,
                   {ROOT_DRIVE_ID: vm_dir / meta["machine"]["rootfs"]}, meta)
        require_snapshot_files((snap.vmstate, snap.mem), hint)
        return snap

    def check_inputs(self, vm_dir: Path) -> None:
        """The root disk must be the very file the snapshot was taken with."""
        check_snapshot_inputs(self.meta.get("files"), vm_dir, "run: dhvm prepare --backend firecracker")

    def check_version(self, version: Version) -> None:
        """Only the Firecracker version that made a snapshot restores it."""
        made = self.firecracker_version
        if made != version:
            raise BackendUnavailable(
                f"the snapshot under {self.dir} was made by Firecracker {version_str(made)}, but the binary is "
                f"{version_str(version)}; a snapshot is only restored by the version that made it — run: "
                "dhvm prepare --backend firecracker --rebuild (or pass --firecracker with the old binary)")


# -- prerequisite checks --------------------------------------------------------------------------


def kernel_check(layout: Layout) -> Check:
    kernel = layout.kernel
    try:
        ok = kernel.read_bytes()[:4] == b"\x7fELF" if kernel.stat().st_size else False
    except OSError:
        ok = False
    return Check("kernel", ok, f"ELF vmlinux at {kernel}" if ok else f"no ELF vmlinux at {kernel}",
                 "run: dhvm prepare --backend firecracker")


def api_check(fc: FirecrackerBinary, timeout: float = 5.0) -> Check:
    """Start the binary with its API socket in a private temporary directory, ask ``GET /`` and stop
    it: proves the binary runs on this host (its libc, seccomp filters, the socket), with no VM made.
    The process dies with its parent (PR_SET_PDEATHSIG), so even a killed caller leaves none behind."""
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="dhg-fc-check-"))
    proc: subprocess.Popen | None = None
    api: FirecrackerAPI | None = None
    t0 = time.perf_counter()
    try:
        with open(d / "out.log", "wb") as out:
            proc = subprocess.Popen([str(fc.path), "--api-sock", API_SOCK, "--id", "dhg-check"], cwd=d,
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True, preexec_fn=_die_with_parent)
        api = FirecrackerAPI(d / API_SOCK, fc.version)
        api.wait_ready(timeout, is_alive=lambda: proc is not None and proc.poll() is None)
        info = api.request("GET", "/", None) or {}
        return Check("firecracker_api", True, f"it started and answered on its API socket in "
                                              f"{(time.perf_counter() - t0) * 1000:.0f} ms (vmm_version "
                                              f"{info.get('vmm_version')}, state {info.get('state')!r})")
    except (FirecrackerAPIError, OSError) as e:
        said = (d / "out.log").read_text(errors="replace").strip().splitlines()[-1:] if (d / "out.log").exists() else []
        return Check("firecracker_api", False, f"{fc.path} did not serve its API here: "
                     f"{getattr(e, 'fault', e)}" + (f" (it said: {said[0][:200]})" if said else ""),
                     f"run it by hand to see why: {fc.path} --api-sock /tmp/fc-test.sock")
    finally:
        if api is not None:
            api.close()
        if proc is not None and proc.poll() is None:
            proc.kill()
        if proc is not None:
            proc.wait()
        shutil.rmtree(d, ignore_errors=True)


def _die_with_parent() -> None:
    """In the child, between fork and exec: SIGKILL when the parent dies."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, 9, 0, 0, 0)


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


@dataclass
class Launcher:
    """How to start one Firecracker process for an instance (plain, or under the jailer)."""

    fc: FirecrackerBinary
    jailer: Path | None = None
    uid: int = 0
    gid: int = 0

    def root(self, rec: InstanceRecord) -> Path:
        """The instance root: the run dir, or the jailer's chroot inside it."""
        if self.jailer is None:
            return Path(rec.dir)
        return Path(rec.dir) / "jail" / self.fc.path.name / rec.id / "root"

    def argv(self, rec: InstanceRecord, plan: netns.NetPlan | None) -> list[str]:
        if self.jailer is None:
            return [str(self.fc.path), "--api-sock", API_SOCK, "--id", rec.id]
        argv = [str(self.jailer), "--id", rec.id, "--exec-file", str(self.fc.path), "--uid", str(self.uid),
                "--gid", str(self.gid), "--chroot-base-dir", str(Path(rec.dir) / "jail"),
                "--cgroup-version", "2" if os.path.exists("/sys/fs/cgroup/cgroup.controllers") else "1"]
        if plan is not None:
            argv += ["--netns", plan.netns_path]
        return argv + ["--", "--api-sock", "/" + API_SOCK]

    def cleanup_items(self, rec: InstanceRecord) -> list[dict]:
        """The jailer makes a cgroup per instance, outside the run dir: recorded for destroy()."""
        if self.jailer is None:
            return []
        name = self.fc.path.name
        # cgroup v2 (one tree), then v1 (a tree per controller).
        dirs = [f"/sys/fs/cgroup/{name}/{rec.id}"] + [f"{d}/{rec.id}" for d in sorted(glob.glob(f"/sys/fs/cgroup/*/{name}"))]
        return [{"kind": "jailer", "id": rec.id, "cgroup_dirs": dirs}]

    def populate(self, root: Path, files: dict[str, Path]) -> None:
        """Put the artifacts in the root under their recorded names: symlinks in a run dir, hard
        links in a chroot (a symlink would point outside it), each readable by the jail's user."""
        root.mkdir(parents=True, exist_ok=True)
        for name, target in files.items():
            dst = root / name
            if self.jailer is None:
                os.symlink(target, dst)
            else:
                self.grant_read(target)
                try:
                    os.link(target, dst)
                except OSError as e:
                    raise BackendUnavailable(f"cannot hard-link {target} into the jailer chroot {root} ({e}); "
                                             "DHG_HOME/vm must be on one filesystem") from None
        (root / FC_LOG).touch(mode=0o600)  # older Firecrackers open the log file without creating it
        if self.jailer is not None:
            os.chown(root / FC_LOG, self.uid, self.gid)

    def grant_read(self, target: Path) -> None:
        """Let the jailed Firecracker (``uid``:``gid``, often not the files' owner) read a file it must
        open: the file gets the jail's group, read-only (g+r), and nothing else changes. A hard link is
        the same inode, so this is done on the original, once."""
        st = target.stat()
        if self.uid in (0, st.st_uid) or (st.st_gid == self.gid and st.st_mode & 0o040):
            return
        try:
            os.chown(target, -1, self.gid)
            os.chmod(target, (st.st_mode & 0o7777) | 0o040)
        except OSError as e:
            raise BackendUnavailable(f"the jailer runs Firecracker as uid {self.uid}, gid {self.gid}, which cannot read "
                                     f"{target}, and its group could not be set ({e}); run as root, or give the "
                                     "jail a group that can read DHG_HOME/vm") from None

    def spawn(self, rec: InstanceRecord, plan: netns.NetPlan | None) -> subprocess.Popen:
        root = self.root(rec)
        enter = None
        if plan is not None and self.jailer is None:
            name = plan.netns
            enter = lambda: netns.enter(name)  # noqa: E731 - runs between fork and exec
        with open(Path(rec.dir) / CONSOLE_LOG, "ab") as console:
            # The guest's serial console is Firecracker's stdout: the instance log, as with QEMU.
            proc = subprocess.Popen(self.argv(rec, plan), cwd=root if self.jailer is None else rec.dir,
                                    stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT,
                                    start_new_session=True, umask=0o077, preexec_fn=enter)
        rec.add_process(proc.pid, "firecracker")
        return proc


def cleanup(item: dict) -> None:
    """``instances.destroy`` hook: remove the jailer's per-instance cgroups (empty once it is dead)."""
    for d in item.get("cgroup_dirs", []):
        # Only a directory named after this instance, under the cgroup tree, is ever removed.
        if d.startswith("/sys/fs/cgroup/") and Path(d).name == item.get("id") and os.path.isdir(d):
            try:
                os.rmdir(d)
            except OSError:
                pass


class FirecrackerBackend(Backend):
    """Restores Firecracker microVMs from the snapshot ``dhvm prepare --backend firecracker`` made."""

    name = "firecracker"

    def __init__(self, layout: Layout, dh_version: str = DH_VERSION, firecracker: str | None = None,
                 jailer: str | None = None, jailer_uid: int | None = None, jailer_gid: int | None = None,
                 network: bool = False, netns_parent: str | None = None,
                 restore_timeout: float = RESTORE_TIMEOUT_S, heap: str | None = None, snapshot: str | None = None, **_ignored):
        self.start_from = snapshot
        """A checkpoint's name: every VM starts from it instead of the base snapshot (``Dhvm.snapshot``)."""
        self.layout = layout
        self.dh_version = dh_version
        self.firecracker = firecracker
        self.jailer = jailer
        self.jailer_uid = jailer_uid
        self.jailer_gid = jailer_gid
        self.network = network
        self.netns_parent = netns_parent
        self.restore_timeout = restore_timeout
        self.heap_requested = heap
        self._fc: FirecrackerBinary | None = None
        self._snapshot: FcSnapshot | None = None
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
        try:
            return json.loads((self.layout.firecracker_snapshots(self.dh_version) / FcSnapshot.METADATA).read_text())
        except (OSError, ValueError):
            return {}

    def snapshot(self, checkpoint: str | None = None) -> FcSnapshot:
        """What a VM starts from: the checkpoint ``checkpoint`` (or ``start_from``) or the base snapshot,
        checked as the base is (and a checkpoint against the base it grew from)."""
        base = self.base_snapshot()
        name = checkpoint or self.start_from
        if not name:
            return base
        snap = store.snapshot_of(self.layout, name, self.name, base.meta, self.dh_version,
                                       lambda d: FcSnapshot.load_from(d, self.layout.vm))
        snap.check_inputs(self.layout.vm)
        snap.check_version(self.binary().version)
        return snap

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

    can_checkpoint = True

    def checkpoint_bytes(self, instance: FirecrackerInstance) -> int:
        return instance.snapshot.machine.ram_mb * 2**20  # a Full snapshot writes all of guest memory

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

    def describe(self) -> dict:
        out: dict = {"backend": self.name, "isolation": "Firecracker microVM (KVM)",
                     "checks": {c.name: ("ok: " if c.ok else "FAILED: ") + str(c) for c in self.checks(run_binary=True)}}
        if self.start_from:
            out["start_from"] = self.start_from
        if self._fc:
            out.update(self._fc.describe())
        if self._snapshot:
            m = self._snapshot.machine
            out.update({"snapshot": str(self._snapshot.dir), "ram_mb": m.ram_mb, "vcpus": m.vcpus, "heap": m.heap,
                        "network": m.network, "snapshot_created": self._snapshot.meta.get("created")})
        if self.heap_requested and self.heap_requested != out.get("heap"):
            out["note"] = f"heap {self.heap_requested} requested, but the snapshot's JVM has {out.get('heap')}"
        return out


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


def restore(layout: Layout, launcher: Launcher, snap: FcSnapshot, network: bool = False,
            timeout: float = RESTORE_TIMEOUT_S, netns_parent: str | None = None, agent: bool = True) -> FirecrackerInstance:
    """One clone of ``snap`` in a run dir of its own: spawn, load, hand over clock and entropy, forward DH.
    ``agent=False`` stops once the VM is loaded and resumed (for guests without our agent: the tests'
    and the bench's minimal guest)."""
    t0 = time.perf_counter()
    rec = new_instance(layout, FirecrackerBackend.name)
    plan = None
    inst: FirecrackerInstance | None = None
    try:
        rec.info["cleanup"] = launcher.cleanup_items(rec)
        rec.save()
        if network:
            plan = netns.setup(rec.id, layout.run, netns_parent)
            rec.info["cleanup"].append(plan.cleanup_item())
            rec.info["network"] = {"netns": plan.netns, "guest_ip": netns.GUEST_IP}
            rec.save()
        root = launcher.root(rec)
        launcher.populate(root, {VMSTATE_NAME: snap.vmstate, MEM_NAME: snap.mem, ROOTFS_NAME: snap.disks[ROOT_DRIVE_ID]})
        spawn_ms = _ms(t0)  # the VMM process (or its jailer) starts here
        proc = launcher.spawn(rec, plan)
        inst = FirecrackerInstance(rec, proc, root, snap)
        inst.timings["spawn_ms"] = spawn_ms
        inst.api = open_api(root, launcher.fc)
        inst.api.wait_ready(is_alive=inst.alive)
        inst.timings["api_ms"] = _ms(t0)
        send(inst.api, restore_calls(launcher.fc.version, network))
        inst.timings["loaded_ms"] = _ms(t0)
        if not agent:
            return inst
        inst.handshake(vsock.connect(inst.vsock_path, AGENT_VSOCK_PORT, timeout, inst.alive,
                                     refused_limit=RESTORE_REFUSED_S), new_key(), timeout)
        inst.forwarder = vsock.PortForwarder(inst.vsock_path, GUEST_DH_PORT)
        inst.timings["ready_ms"] = _ms(t0)
    except Exception as e:
        tail = inst.log_tail() if inst else ""
        if inst is not None:
            inst.stop()
        else:
            from ..instances import destroy

            destroy(rec)
        if isinstance(e, (BackendUnavailable, netns.NetworkSetupError)):
            raise
        fix = (f"If the checkpoint is damaged, remove it: dhvm checkpoint rm {snap.dir.name}"
               if "checkpoint" in snap.meta else
               "If the snapshot is stale, run: dhvm prepare --backend firecracker --rebuild")
        raise AgentStartError(f"Firecracker restore from {snap.dir} failed: {e}\n--- guest console / {FC_LOG} ---\n"
                              f"{tail}\n{fix}") from None
    port = inst.forwarder.port
    rec.info.update({"snapshot": str(snap.dir), "firecracker_version": version_str(launcher.fc.version),
                     "deephaven_port": port, "deephaven_url": f"http://127.0.0.1:{port}/ide/",
                     "restore_ms": inst.timings["ready_ms"]})
    rec.save()
    return inst


# -- the cold boot (used by dhvm prepare) ---------------------------------------------------------


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
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def destroy(self) -> None:
        from ..instances import destroy

        self._stop_vmm()
        destroy(self.rec)


def take_snapshot_files(root: Path, work: Path, names: dict[str, str], move=os.replace) -> None:
    """Move the files Firecracker wrote in an instance root into ``work`` (``names``: written name ->
    the snapshot's name), each on disk (fsync) before the snapshot is declared done."""
    for written, name in names.items():
        with open(root / written, "rb+") as fh:
            os.fsync(fh.fileno())
        move(str(root / written), work / name)


def snapshot_sizes(directory: Path) -> dict:
    """What a snapshot's files take: the memory file's size and its blocks on disk, and the device state."""
    mem = (directory / MEM_NAME).stat()
    return {"mem_bytes": mem.st_size, "mem_allocated_bytes": mem.st_blocks * 512,
            "vmstate_bytes": (directory / VMSTATE_NAME).stat().st_size}


def new_snapshot_meta(fc: FirecrackerBinary, machine: FcMachine, vm_dir: Path, files: dict | None = None,
                      **extra) -> dict:
    """The metadata every Firecracker snapshot records (version, machine, input stamps, when).
    ``files``: the input stamps; by default the root disk's now (a checkpoint keeps its base snapshot's,
    which every restore of it checks)."""
    if files is None:
        files = {machine.rootfs: file_stamp(vm_dir / machine.rootfs)}
    return {"backend": "firecracker", "format": SNAPSHOT_FORMAT,
            "firecracker_version": version_str(fc.version), "firecracker": str(fc.path),
            "machine": asdict(machine), "files": files, "agent_vsock_port": AGENT_VSOCK_PORT, "guest_cid": GUEST_CID,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), **extra}


def _ms(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1000, 1)


__all__ = ["AGENT_VSOCK_PORT", "Call", "Check", "FcColdBoot", "FcMachine", "FcSnapshot", "FirecrackerBackend",
           "FirecrackerInstance", "Launcher", "checkpoint_calls", "cold_boot_calls", "restore", "restore_calls",
           "resume_calls", "snapshot_calls", "FirecrackerAPIError", "SpecError"]
