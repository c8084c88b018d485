"""A Firecracker snapshot on disk: its files (``vmstate``, ``mem``), the checks made before a restore, and
the metadata every snapshot (base or checkpoint) records."""


import datetime as _dt
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import BackendUnavailable
from .base import (SNAPSHOT_METADATA, check_snapshot_inputs, file_stamp, mem_sizes, read_snapshot_metadata,
                   require_snapshot_files, snapshot_meta)
from .fc_api import Version, parse_version, version_str
from .fc_release import FirecrackerBinary
from .fc_calls import (AGENT_VSOCK_PORT, GUEST_CID, MEM_NAME, ROOT_DRIVE_ID, SNAPSHOT_FORMAT, VMSTATE_NAME,
                       FcMachine)


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



def take_snapshot_files(root: Path, work: Path, names: dict[str, str], move=os.replace) -> None:
    """Move the files Firecracker wrote in an instance root into ``work`` (``names``: written name ->
    the snapshot's name), each on disk (fsync) before the snapshot is declared done."""
    for written, name in names.items():
        with open(root / written, "rb+") as fh:
            os.fsync(fh.fileno())
        move(str(root / written), work / name)


def snapshot_sizes(directory: Path) -> dict:
    """What a snapshot's files take: the memory file's size and its blocks on disk, and the device state."""
    return {**mem_sizes(directory / MEM_NAME), "vmstate_bytes": (directory / VMSTATE_NAME).stat().st_size}


def new_snapshot_meta(fc: FirecrackerBinary, machine: FcMachine, vm_dir: Path, files: dict | None = None,
                      sizes: dict | None = None, **extra) -> dict:
    """The metadata every Firecracker snapshot records (version, machine, input stamps, when).
    ``files``: the input stamps; by default the root disk's now (a checkpoint keeps its base snapshot's,
    which every restore of it checks)."""
    if files is None:
        files = {machine.rootfs: file_stamp(vm_dir / machine.rootfs)}
    return snapshot_meta("firecracker", SNAPSHOT_FORMAT, machine, files, sizes or {},
                         firecracker_version=version_str(fc.version), firecracker=str(fc.path),
                         agent_vsock_port=AGENT_VSOCK_PORT, guest_cid=GUEST_CID,
                         created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), **extra)
