"""Firecracker's API as this backend uses it: the names inside an instance root, the machine, and the
request lists of each step (cold boot, snapshot, checkpoint, resume, restore), sent in order by ``send``.

Each list is a plain value (``Call``), so the tests check every body against Firecracker's own spec
for every supported version without starting a VM.
"""


import os
from dataclasses import dataclass
from pathlib import Path

from . import netns
from .fc_api import FirecrackerAPI, Spec, Version, spec_beside, supports
from .fc_release import FirecrackerBinary
from .machine import DEFAULT_HEAP, DEFAULT_RAM_MB, guest_cmdline


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

