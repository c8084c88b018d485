"""Defaults and paths: one copy of every limit, extension list and directory layout."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DH_VERSION = "42.7"
DEFAULT_MAX_ROWS = 1000
DEFAULT_MAX_PUSH_MB = 50.0
DEFAULT_TIMEOUT_S = 0.0  # 0: no limit
# Set in a cluster kernel's environment (dhg_kernel.cluster) to the host it was started on.
CLUSTER_HOST_ENV = "DHG_CLUSTER_HOST"
DEFAULT_BACKEND = "auto"  # firecracker if it can run, else qemu (with a prepared snapshot), else local
DEFAULT_MODE = "per-session"
DEFAULT_DTYPE_BACKEND = "numpy_nullable"
DATA_EXTENSIONS = (".csv", ".tsv", ".json", ".jsonl", ".parquet", ".arrow", ".txt", ".xml", ".yaml", ".yml", ".py")
# How long an agent may take from process start to answering (a cold JVM + Deephaven start).
AGENT_START_TIMEOUT_S = 180.0
# How long a cancelled cell may take to stop before its VM is declared stuck and replaced.
CANCEL_GRACE_S = 2.0
# A streamed fetch stops between batches, after the slice it is converting: allow for that in a VM.
STREAM_CANCEL_GRACE_S = 30.0
# How long a completion or inspection may take before its answer is dropped (the VM is kept).
QUESTION_DEADLINE_S = 3.0
# How often a VM gets the host's wall clock while a session lives (its own clock drifts under emulation).
CLOCK_NOTICE_S = 1.0
# DHG_HOME and the directories of ours under it: the owner only (run dirs hold sockets that run any code).
PRIVATE_DIR_MODE = 0o700


def default_backend() -> str:
    """``$DHG_BACKEND`` or ``auto``."""
    return os.environ.get("DHG_BACKEND") or DEFAULT_BACKEND


def default_mode() -> str:
    """``$DHG_MODE`` or ``per-session``."""
    return os.environ.get("DHG_MODE") or DEFAULT_MODE


def default_start_from() -> str:
    """``$DHG_START_FROM`` (a checkpoint's name; ``$DHG_SNAPSHOT``, its old name, still works) or empty."""
    return os.environ.get("DHG_START_FROM") or os.environ.get("DHG_SNAPSHOT") or ""


def dhg_home(override: str | os.PathLike | None = None) -> Path:
    """``--config-dir`` wins, then ``$DHG_HOME``, then ``~/.dhg``."""
    if override:
        return Path(override).expanduser().resolve()
    env = os.environ.get("DHG_HOME")
    if env:
        return Path(env).expanduser().resolve()
    return Path.home() / ".dhg"


@dataclass(frozen=True)
class Layout:
    """Every path under ``DHG_HOME``: nothing else builds one (docs/design-facts.md, "The DHG_HOME layout")::

        vm/rootfs/{base/, wheels/<v>/, rootfs-<v>.ext4}   the guest tree, its wheels, the root disk
        vm/kernel/{vmlinux, initrd.img}                   the guest kernel (PVH) and its initrd
        vm/snapshots/<v>/                                 the QEMU snapshot
        vm/firecracker/{v<X.Y.Z>/, snapshots/<v>/}        Firecracker releases and snapshots
        vm/run/<instance>/                                one directory per running instance
        vm/{prepare-state.json, prepare.log, prepare.lock, cold-boot-console.log, accel-probe.json}
        cache/classes-<hash>/                             the agent's Java classes for the local backend
        checkpoints/<name>/                               saved sessions (mem, state, metadata.json)
    """

    home: Path

    @classmethod
    def resolve(cls, override: str | os.PathLike | None = None) -> "Layout":
        return cls(dhg_home(override))

    @property
    def vm(self) -> Path:
        return self.home / "vm"

    def private_dir(self, path: Path | None = None) -> Path:
        """Make ``path`` (default: DHG_HOME) and every directory between DHG_HOME and it, each 0700, and
        tighten those that already exist, are ours and are open to others (a home made before this rule).
        Returns ``path``."""
        path = Path(path) if path is not None else self.home
        parts = path.relative_to(self.home).parts  # ValueError for a path outside DHG_HOME: a bug of ours
        chain = [self.home.joinpath(*parts[:i]) for i in range(len(parts) + 1)]
        self.home.parent.mkdir(parents=True, exist_ok=True)  # where the user put DHG_HOME: not ours to restrict
        for d in chain:
            try:
                d.mkdir(mode=PRIVATE_DIR_MODE)
            except FileExistsError:
                pass
            st = d.stat()
            if st.st_uid == os.geteuid() and st.st_mode & 0o077:
                os.chmod(d, PRIVATE_DIR_MODE)  # also undoes a umask or default ACL that widened mkdir's mode
        return path

    def rel(self, path: Path) -> str:
        """``path`` relative to ``vm`` (snapshots record their inputs so, to survive a moved DHG_HOME)."""
        return str(path.relative_to(self.vm))

    # -- running instances -------------------------------------------------------------------------

    @property
    def run(self) -> Path:
        """Per-instance directories: ``run/<instance>/`` with instance.json, sockets, logs."""
        return self.vm / "run"

    @property
    def cache(self) -> Path:
        """Things built on the host and reused across instances (the agent's compiled Java classes)."""
        return self.home / "cache"

    # -- the image -------------------------------------------------------------------------------------

    @property
    def rootfs_tree(self) -> Path:
        """The guest's root tree (debootstrap + venv + our files), made into the root disk."""
        return self.vm / "rootfs" / "base"

    def wheels(self, dh_version: str = DH_VERSION) -> Path:
        return self.vm / "rootfs" / "wheels" / dh_version

    def rootfs_image(self, dh_version: str = DH_VERSION) -> Path:
        return self.vm / "rootfs" / f"rootfs-{dh_version}.ext4"

    @property
    def kernel(self) -> Path:
        return self.vm / "kernel" / "vmlinux"

    @property
    def initrd(self) -> Path:
        return self.vm / "kernel" / "initrd.img"

    # -- snapshots, per backend ------------------------------------------------------------------------

    def snapshots(self, dh_version: str = DH_VERSION) -> Path:
        """The QEMU snapshot of ``dh_version``."""
        return self.vm / "snapshots" / dh_version

    @property
    def firecracker(self) -> Path:
        """Firecracker releases (``v<X.Y.Z>/``, downloaded and verified) and Firecracker snapshots."""
        return self.vm / "firecracker"

    def firecracker_release(self, tag: str) -> Path:
        """One downloaded (and verified) Firecracker release: ``firecracker``, ``jailer``, its spec, SOURCE."""
        return self.firecracker / tag

    def firecracker_snapshots(self, dh_version: str = DH_VERSION) -> Path:
        return self.firecracker / "snapshots" / dh_version

    def snapshot_dir(self, backend: str, dh_version: str = DH_VERSION) -> Path:
        """Where ``backend``'s snapshot of ``dh_version`` lives."""
        if backend == "firecracker":
            return self.firecracker_snapshots(dh_version)
        if backend == "qemu":
            return self.snapshots(dh_version)
        raise ValueError(f"no snapshots for backend {backend!r}")

    def all_snapshot_dirs(self, dh_version: str = DH_VERSION) -> list[Path]:
        """Every backend's snapshot of ``dh_version`` (what ``dhvm clean`` removes)."""
        return [self.snapshots(dh_version), self.firecracker_snapshots(dh_version)]

    # -- checkpoints ---------------------------------------------------------------------------------

    @property
    def checkpoints(self) -> Path:
        """Saved sessions (``dhvm checkpoint``): one directory each, like a snapshot's, plus partial
        ones being written (``.partial-<name>-<pid>``)."""
        return self.home / "checkpoints"

    def checkpoint(self, name: str) -> Path:
        return self.checkpoints / name

    # -- prepare's own files -----------------------------------------------------------------------

    @property
    def prepare_state(self) -> Path:
        """The checksum of each prepare phase's inputs (a phase whose inputs did not change is skipped)."""
        return self.vm / "prepare-state.json"

    @property
    def prepare_log(self) -> Path:
        return self.vm / "prepare.log"

    @property
    def prepare_lock(self) -> Path:
        return self.vm / "prepare.lock"

    @property
    def cold_boot_console(self) -> Path:
        """The guest console of the last failed cold boot (kept for the error message)."""
        return self.vm / "cold-boot-console.log"

    @property
    def accel_probe(self) -> Path:
        """Whether a probe boot under KVM works on this host (``{"key", "accel": "kvm"|"tcg"}``)."""
        return self.vm / "accel-probe.json"
