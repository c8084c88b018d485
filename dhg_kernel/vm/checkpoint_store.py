"""Checkpoints: a running session's VM saved under a name, to start new sessions from.

A checkpoint is laid out like the snapshot it grew from (for QEMU: ``mem``, ``state`` and
``metadata.json``), so a restore from it is the very same lazy restore: ``mem`` mapped privately
(copy-on-write; no restore ever writes it) and the device state loaded. What it adds to the
snapshot's metadata is a ``checkpoint`` part: its name, when it was made, the base snapshot it grew
from, the tables it holds and its size on disk.

A checkpoint is written into ``.partial-<name>-<pid>@<start time>`` (0700) and renamed to ``<name>``
only once its metadata is written, last: a save that fails or is killed never appears under its name,
and a partial directory whose writer is dead (a zombie is dead) is removed by the next listing or save.

Once written, a checkpoint does not change: its metadata records each file's size and digest
(``vm/integrity``), checked at every listing and before any restore, so a damaged one is named as
damaged, with the fix, before a VMM sees it. Its files are read-only (0400) and its directory 0500,
except the files a backend's VMM must open for writing (QEMU 7.2 opens ``mem`` O_RDWR even when it maps
it privately: its ``readonly=on`` makes the guest's RAM a ROM). No ``chattr +i``: QEMU could then not
open ``mem`` at all, nor the Firecracker jailer hard-link the files into its chroot.

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
from functools import cached_property
from pathlib import Path
from typing import Callable, Iterator, TypeVar

from ..config import Layout
from ..errors import BackendUnavailable, CheckpointError, UsageError
from ..instances import alive, proc_start_time
from . import integrity
from .base import SNAPSHOT_METADATA, write_snapshot_metadata

T = TypeVar("T")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}\Z")
PARTIAL = ".partial-"
# The writer's pid and start time at the end of a partial (or trash) directory's name: ``-<pid>[@<start>]``.
WRITER = re.compile(r"-(\d+)(?:@(\d+))?\Z")
# A finished checkpoint is read-only; a file its VMM opens for writing keeps the owner's write bit.
FILE_MODE, WRITABLE_FILE_MODE, DIR_MODE = 0o400, 0o600, 0o500
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

    @cached_property
    def problem(self) -> str | None:
        """What is wrong with the checkpoint's files (checked once), or None when they are as saved."""
        return _check_files(self)

    def check_intact(self) -> None:
        """Refuse a damaged checkpoint, saying what is wrong and the commands that fix it."""
        if self.problem:
            raise CheckpointError(f"checkpoint {self.name} is damaged: {self.problem}; delete it and save it again: "
                                  f"%dhvm checkpoint {self.name} --overwrite, or dhvm checkpoint create {self.name} "
                                  f"--from SCRIPT --overwrite (or delete it: dhvm checkpoint rm {self.name})")

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
                "save_s": info.get("save_s"), "dir": str(self.dir),
                "status": f"DAMAGED: {self.problem}; delete it and save it again (dhvm checkpoint rm {self.name})"
                if self.problem else "ok"}


def _check_files(ck: Checkpoint) -> str | None:
    """The first file that differs from its record; a checkpoint saved before records were kept is
    checked by the sizes its backend noted (a short ``mem`` is what QEMU would extend)."""
    record = ck.info.get("integrity")
    if record is None:
        sizes = ck.meta.get("sizes") or {}
        record = {n: {"bytes": sizes[k]} for n, k in (("mem", "mem_bytes"), ("state", "state_bytes"),
                                                      ("vmstate", "vmstate_bytes")) if k in sizes}
    for name, want in sorted(record.items()):
        problem = integrity.check(ck.dir / name, want)
        if problem:
            return problem
    return None


def _writer_suffix() -> str:
    """``-<pid>@<start time>``: ``alive`` then tells a dead writer (or a zombie, or a recycled pid) from a live one."""
    start = proc_start_time(os.getpid())
    return f"-{os.getpid()}" + (f"@{start}" if start is not None else "")


def remove_tree(path: Path) -> None:
    """Delete a checkpoint's directory: its read-only (0500) directories get their write bit back first."""
    for d, _, _ in os.walk(path):
        with contextlib.suppress(OSError):
            os.chmod(d, 0o700)
    shutil.rmtree(path, ignore_errors=True)


def reap_partials(layout: Layout) -> int:
    """Remove the partial checkpoints of writers that are gone; returns how many."""
    gone = 0
    root = layout.checkpoints
    if not root.is_dir():
        return 0
    for p in root.iterdir():
        writer = WRITER.search(p.name) if p.name.startswith(PARTIAL) else None
        if writer is None:
            continue
        start = writer.group(2)
        if not alive(int(writer.group(1)), int(start) if start else None):
            remove_tree(p)
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
                if not alive(int(owner), ck.info.get("temporary_for_start")):
                    remove_tree(p)
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
    trash = layout.checkpoints / f"{PARTIAL}{name}.rm{_writer_suffix()}"
    os.replace(ck.dir, trash)
    remove_tree(trash)
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
    work = root / f"{PARTIAL}{name}{_writer_suffix()}"
    remove_tree(work)
    work.mkdir(mode=0o700)
    try:
        yield work
        if not (work / SNAPSHOT_METADATA).is_file():
            raise CheckpointError(f"the checkpoint {name!r} was not completed")
        old = root / f"{PARTIAL}{name}.old{_writer_suffix()}"
        if final.exists():
            os.replace(final, old)
        os.chmod(work, DIR_MODE)  # nothing is added to or removed from a finished checkpoint
        os.replace(work, final)
        remove_tree(old)
    except BaseException:
        remove_tree(work)
        raise


def finish(work: Path, backend_meta: dict, info: dict, writable: tuple[str, ...] = ()) -> None:
    """Write a checkpoint's metadata (last, atomically): the backend's part and the checkpoint's own,
    with each file's size and digest; then every file is read-only, but those in ``writable`` (the
    files the backend's VMM opens for writing, though it never writes them)."""
    files = sorted(p for p in work.iterdir() if p.is_file())
    info = {**info, "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "integrity": {p.name: integrity.fingerprint(p) for p in files}}
    for p in files:
        os.chmod(p, WRITABLE_FILE_MODE if p.name in writable else FILE_MODE)
    write_snapshot_metadata(work, {**backend_meta, "checkpoint": info})
    os.chmod(work / SNAPSHOT_METADATA, FILE_MODE)


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
    checking that its files are as saved and that it may be restored here."""
    ck = load(layout, name)
    ck.check_intact()
    check_compatible(ck, backend, base_meta, dh_version)
    try:
        return read(ck.dir)
    except BackendUnavailable as e:
        raise CheckpointError(f"checkpoint {name} is damaged ({e}); delete it and save it again: %dhvm checkpoint "
                              f"{name} --overwrite (or delete it: dhvm checkpoint rm {name})") from None
