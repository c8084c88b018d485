"""Checkpoints: a running session's VM saved under a name, to start new sessions from.

A checkpoint is laid out like the snapshot it grew from (for QEMU: ``mem``, ``state`` and
``metadata.json``), so a restore from it is the very same lazy restore: ``mem`` mapped privately
(copy-on-write; no restore ever writes it) and the device state loaded. What it adds to the
snapshot's metadata is a ``checkpoint`` part: its name, when it was made, the base snapshot it grew
from, the tables it holds and its size on disk.

A checkpoint is written into ``.partial-<name>-<pid>`` (0700) and renamed to ``<name>`` only once its
metadata is written, last: a save that fails or is killed never appears under its name, and a partial
directory whose writer is dead is removed by the next listing or save.

A checkpoint is only restored into the world it was made in: the same backend, Deephaven version,
kernel and root disk (the guest's page cache points into that disk), and the same base snapshot.
Anything else is refused with the command that fixes it.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, TypeVar

from ..config import Layout
from ..errors import BackendUnavailable, CheckpointError, UsageError
from .base import SNAPSHOT_METADATA, write_snapshot_metadata

T = TypeVar("T")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}\Z")
PARTIAL = ".partial-"
# Free space kept beyond a checkpoint's worst case (its RAM size), so a save never fills the disk.
SPACE_MARGIN_BYTES = 256 * 2**20


def check_name(name: str, what: str = "checkpoint") -> str:
    """A checkpoint (or session) name is a file name: letters, digits, ``_.-``, up to 63, not starting
    with ``.`` or ``-``."""
    if not isinstance(name, str) or not NAME.match(name):
        raise UsageError(f"{name!r} is not a {what} name: use letters, digits, '_', '.' and '-' "
                         f"(up to 63, starting with a letter or digit), e.g. loaded-2024")
    return name


@dataclass
class Checkpoint:
    """One saved checkpoint: its directory and metadata."""

    name: str
    dir: Path
    meta: dict

    @property
    def info(self) -> dict:
        return self.meta.get("checkpoint") or {}

    @property
    def backend(self) -> str:
        return self.meta.get("backend", "?")

    @property
    def dh_version(self) -> str:
        return self.meta.get("dh_version", "?")

    @property
    def tables(self) -> list[str]:
        return list(self.info.get("tables") or [])

    def size_on_disk(self) -> int:
        """Bytes the checkpoint's files take on disk (its memory file is sparse)."""
        return sum(p.stat().st_blocks * 512 for p in self.dir.iterdir() if p.is_file())

    def describe(self) -> dict:
        """What ``dhvm checkpoint list|info`` and ``%dhvm checkpoints`` show."""
        info = self.info
        return {"name": self.name, "created": info.get("created"), "backend": self.backend,
                "deephaven": self.dh_version, "tables": self.tables,
                "size_mb": round(self.size_on_disk() / 2**20, 1), "ram_mb": (self.meta.get("machine") or {}).get("ram_mb"),
                "base_snapshot": (info.get("base") or {}).get("created"), "from": info.get("source"),
                "save_s": info.get("save_s"), "dir": str(self.dir)}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def reap_partials(layout: Layout) -> int:
    """Remove the partial checkpoints of writers that are gone; returns how many."""
    gone = 0
    root = layout.checkpoints
    if not root.is_dir():
        return 0
    for p in root.iterdir():
        if not p.name.startswith(PARTIAL):
            continue
        try:
            pid = int(p.name.rsplit("-", 1)[1])
        except (IndexError, ValueError):
            continue
        if not _pid_alive(pid):
            shutil.rmtree(p, ignore_errors=True)
            gone += 1
    return gone


def list_all(layout: Layout) -> list[Checkpoint]:
    """Every complete checkpoint, oldest first (partial ones of dead writers are removed)."""
    reap_partials(layout)
    root = layout.checkpoints
    out = []
    if root.is_dir():
        for p in sorted(root.iterdir()):
            if p.name.startswith(".") or not (p / SNAPSHOT_METADATA).is_file():
                continue
            try:
                ck = _read(p.name, p)
            except CheckpointError:
                continue
            owner = ck.info.get("temporary_for_pid")
            if owner:  # a fork's, removed once the fork started: never listed; reaped if its maker died
                if not _pid_alive(int(owner)):
                    shutil.rmtree(p, ignore_errors=True)
                continue
            out.append(ck)
    return sorted(out, key=lambda c: c.info.get("created") or "")


def _read(name: str, directory: Path) -> Checkpoint:
    import json

    try:
        meta = json.loads((directory / SNAPSHOT_METADATA).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"the checkpoint {name!r} is unreadable ({e}) — remove it: dhvm checkpoint rm {name}") from None
    return Checkpoint(name, directory, meta)


def load(layout: Layout, name: str) -> Checkpoint:
    """The checkpoint called ``name``; CheckpointError naming the ones there are if it is missing."""
    check_name(name)
    directory = layout.checkpoint(name)
    if not (directory / SNAPSHOT_METADATA).is_file():
        have = [c.name for c in list_all(layout)]
        raise CheckpointError(f"no checkpoint named {name!r} under {layout.checkpoints} "
                              f"({'there are: ' + ', '.join(have) if have else 'there are none'}). "
                              f"Make one from a running session: %dhvm checkpoint {name}, "
                              f"or from a script: dhvm checkpoint create {name} --from setup.py")
    return _read(name, directory)


def remove(layout: Layout, name: str) -> Checkpoint:
    """Delete a checkpoint (VMs restored from it keep running: they hold its memory file open)."""
    ck = load(layout, name)
    trash = layout.checkpoints / f"{PARTIAL}{name}.rm-{os.getpid()}"
    os.replace(ck.dir, trash)
    shutil.rmtree(trash, ignore_errors=True)
    return ck


def check_space(directory: Path, need_bytes: int) -> None:
    """Refuse a save that might not fit, saying how much it needs and how much there is."""
    free = shutil.disk_usage(directory).free
    if free < need_bytes + SPACE_MARGIN_BYTES:
        raise CheckpointError(
            f"not enough disk space for a checkpoint under {directory}: it needs up to "
            f"{(need_bytes + SPACE_MARGIN_BYTES) / 2**30:.1f} GiB (the VM's {need_bytes / 2**20:.0f} MiB of RAM and "
            f"{SPACE_MARGIN_BYTES / 2**20:.0f} MiB to spare), and {free / 2**30:.1f} GiB is free. Free some space, "
            f"e.g. remove old checkpoints (dhvm checkpoint list; dhvm checkpoint rm NAME), or put DHG_HOME on a "
            f"bigger disk")


@contextlib.contextmanager
def writing(layout: Layout, name: str, overwrite: bool, need_bytes: int) -> Iterator[Path]:
    """A fresh partial directory to save into; on success the caller has written the metadata
    (``finish``) and the directory becomes ``<name>`` (replacing the old one with ``overwrite``)."""
    check_name(name)
    root = layout.checkpoints
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(root, 0o700)
    final = layout.checkpoint(name)
    if final.exists() and not overwrite:
        raise CheckpointError(f"a checkpoint named {name!r} already exists ({final}). Replace it: "
                              f"%dhvm checkpoint {name} --overwrite (dhvm checkpoint rm {name} deletes it)")
    reap_partials(layout)
    check_space(root, need_bytes)
    work = root / f"{PARTIAL}{name}-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(mode=0o700)
    try:
        yield work
        if not (work / SNAPSHOT_METADATA).is_file():
            raise CheckpointError(f"the checkpoint {name!r} was not completed")
        old = root / f"{PARTIAL}{name}.old-{os.getpid()}"
        if final.exists():
            os.replace(final, old)
        os.replace(work, final)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def finish(work: Path, backend_meta: dict, info: dict) -> None:
    """Write a checkpoint's metadata (last, atomically): the backend's part and the checkpoint's own."""
    for p in work.iterdir():
        os.chmod(p, 0o600)
    info = {**info, "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    write_snapshot_metadata(work, {**backend_meta, "checkpoint": info})
    os.chmod(work / SNAPSHOT_METADATA, 0o600)


def check_compatible(ck: Checkpoint, backend: str, base_meta: dict, dh_version: str) -> None:
    """A checkpoint restores only where it was made: the same backend, Deephaven and base snapshot."""
    fix = f"make it again (dhvm checkpoint create {ck.name} --from SCRIPT --overwrite) or remove it (dhvm checkpoint rm {ck.name})"
    if ck.backend != backend:
        raise CheckpointError(f"the checkpoint {ck.name!r} was made with the {ck.backend} backend, and this session "
                              f"uses {backend}. Use the same backend (%config Dhvm.backend = '{ck.backend}', "
                              f"or --backend {ck.backend}), or {fix}")
    if ck.dh_version != dh_version:
        raise CheckpointError(f"the checkpoint {ck.name!r} holds Deephaven {ck.dh_version}, and this session runs "
                              f"Deephaven {dh_version}. Use --dh-version {ck.dh_version}, or {fix}")
    base = ck.info.get("base") or {}
    if base.get("key") != base_meta.get("key"):
        raise CheckpointError(f"the checkpoint {ck.name!r} grew from the base snapshot made {base.get('created')}, "
                              f"and `dhvm prepare` has since made a new one ({base_meta.get('created')}): the "
                              f"guest it holds may not match this host's code. {fix[0].upper() + fix[1:]}")


def snapshot_of(layout: Layout, name: str, backend: str, base_meta: dict, dh_version: str, read: Callable[[Path], T]) -> T:
    """The snapshot inside checkpoint ``name`` (read by ``read``, the backend's snapshot loader), after
    checking that it may be restored here."""
    ck = load(layout, name)
    check_compatible(ck, backend, base_meta, dh_version)
    try:
        return read(ck.dir)
    except BackendUnavailable as e:
        raise CheckpointError(f"the checkpoint {name!r} is damaged ({e}); remove it: dhvm checkpoint rm {name}") from None
