"""The small interface every backend implements: start, connect to the agent, stop, describe."""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import time
from abc import ABC, abstractmethod
from dataclasses import asdict
from pathlib import Path
from typing import Callable

from ..client import AgentClient
from ..errors import AgentStartError, BackendUnavailable, CheckpointError
from ..instances import InstanceRecord, destroy


class Instance(ABC):
    """One running agent (a VM, or a local process) owned by this process."""

    def __init__(self, record: InstanceRecord):
        self.record = record
        self.key: str | None = None
        """The Deephaven server's login key (pre-shared key), in memory only: never in a file or argv."""

    @property
    def id(self) -> str:
        return self.record.id

    @property
    def dir(self) -> Path:
        return Path(self.record.dir)

    @abstractmethod
    def connect(self, timeout: float) -> socket.socket:
        """A connected stream socket to the agent (retrying until ``timeout`` while it comes up)."""

    @abstractmethod
    def alive(self) -> bool:
        """True while the instance's processes run."""

    def open_client(self, timeout: float) -> AgentClient:
        """A client on a new connection to the agent."""
        return AgentClient(self.connect(timeout))

    def stop(self) -> None:
        """Destroy the instance: processes killed, run directory removed. Idempotent."""
        destroy(self.record)

    def describe(self) -> dict:
        """What ``status`` shows about this instance."""
        return {"id": self.id, "backend": self.record.backend, "dir": str(self.dir),
                "alive": self.alive(), **self.record.info}

    def log_tail(self, lines: int = 25) -> str:
        """The end of the instance's log, for error messages."""
        return file_tail(self.dir / "agent.log", lines, "(no log)")


class RestoredInstance(Instance):
    """A VM restored from a snapshot by one VMM process, holding the agent client that the restore
    opened (the after-restore handshake ran on it; the first ``open_client`` hands it over)."""

    vmm_log = ""
    """The VMM's own log file (relative to ``log_dir``), appended to ``log_tail``."""

    def __init__(self, record: InstanceRecord, proc: subprocess.Popen):
        super().__init__(record)
        self.proc = proc
        self._restore_client: AgentClient | None = None
        self.timings: dict[str, float] = {}
        """Milliseconds from the start of the restore to each of its steps."""
        self.restored_info: dict = {}
        """The agent's answer to the after-restore handshake (clock skew, entropy)."""

    @property
    def log_dir(self) -> Path:
        return self.dir

    def alive(self) -> bool:
        return self.proc.poll() is None

    def handshake(self, sock: socket.socket, key: str, timeout: float) -> None:
        """The after-restore handshake on the restore's connection (see ``AgentClient.restored``); the
        client is kept for the first ``open_client``. A VM's clock drifts under emulation, so this
        client sends the host's every CLOCK_NOTICE_S while it lives."""
        self._restore_client = AgentClient(sock, clock_notices=True)
        self.key = key
        self.restored_info = self._restore_client.restored(key, timeout)

    def open_client(self, timeout: float) -> AgentClient:
        """The client the restore opened (first call), else one on a new connection."""
        if self._restore_client is not None:
            client, self._restore_client = self._restore_client, None
            return client
        return AgentClient(self.connect(timeout), clock_notices=True)

    def close_handles(self) -> None:
        """Close the VMM's control channels (QMP, API client, forwarders) before the process goes."""

    def stop(self) -> None:
        if self._restore_client is not None:
            self._restore_client.close()
            self._restore_client = None
        self.close_handles()
        super().stop()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass

    def log_tail(self, lines: int = 25) -> str:
        tail = super().log_tail(lines)
        vmm = file_tail(self.log_dir / self.vmm_log, lines, "")
        return f"{tail}\n--- {self.vmm_log} ---\n{vmm}" if vmm.strip() else tail


class Backend(ABC):
    """Starts instances of one kind."""

    name: str = "?"

    @abstractmethod
    def start(self, checkpoint: str | None = None) -> Instance:
        """Start (or restore) an instance whose agent is ready to accept a connection; ``checkpoint``:
        restore it from that checkpoint (``dhvm checkpoint``) instead of the usual snapshot."""

    def checkpoint(self, instance: Instance, work: Path, resumed: Callable[[], None] = lambda: None) -> dict:
        """Save the running ``instance`` into the directory ``work`` (memory and device state, laid out
        like this backend's snapshots) and let it run on; returns the backend's part of the metadata.
        The caller holds the instance's agent still around the call; ``resumed`` is called once the VM
        runs again (the agent may then be released, while the files are still being written)."""
        raise CheckpointError(self.no_checkpoints())

    can_checkpoint = False
    """Whether ``checkpoint`` works (and ``start`` takes a checkpoint)."""

    checkpoint_writable_files: tuple[str, ...] = ()
    """Files of a checkpoint the VMM opens read-write on restore (kept writable by the owner only)."""

    can_fork = False
    """Whether ``fork`` copies a running instance into a new one directly (else a fork goes through a
    temporary checkpoint)."""

    start_from: str | None = None
    """The checkpoint ``start()`` restores (None: the base snapshot made by ``dhvm prepare``)."""

    def fork(self, parent: Instance, resumed: Callable[[], None] = lambda: None) -> Instance:
        """A new instance whose state is ``parent``'s now (``can_fork`` backends)."""
        raise CheckpointError(self.no_checkpoints())

    def snapshot(self, checkpoint: str | None = None):
        """What a new instance starts from: checkpoint ``checkpoint`` (or ``start_from``), else the base
        snapshot; refused (with the fix) when missing or made for another image."""
        raise CheckpointError(self.no_checkpoints())

    def base_snapshot(self):
        """The snapshot ``dhvm prepare`` made (None: this backend starts without one)."""
        return None

    def why_not(self) -> str | None:
        """Why this backend cannot start instances on this host (None: it can)."""
        return None

    def checkpoint_bytes(self, instance: Instance) -> int:
        """The most disk a checkpoint of ``instance`` can take (its RAM)."""
        return 0

    def no_checkpoints(self) -> str:
        """Why this backend cannot save or restore checkpoints, and what to use instead."""
        return (f"the {self.name} backend cannot save or restore checkpoints: only a VM's whole memory can be "
                f"saved and brought back. Use a microVM backend: %config Dhvm.backend = 'qemu' (or --backend qemu)")

    isolation = "?"
    """What keeps an instance from the host, for ``status``."""

    heap_requested: str | None = None
    """A heap size asked for; a snapshot's JVM keeps the heap it was prepared with (only reported)."""

    def describe(self) -> dict:
        """Backend facts for ``status``: the common ones built here (name, isolation, what a VM starts from,
        the snapshot's machine, a heap asked for but not had), each backend's own from ``describe_own``
        and ``describe_machine``."""
        out: dict = {"backend": self.name, "isolation": self.isolation, **self.describe_own()}
        if self.start_from:
            out["start_from"] = self.start_from
        try:
            snap = self.described_snapshot()
        except BackendUnavailable as e:
            out["snapshot_error"] = str(e)
            snap = None
        if snap is not None:
            m = snap.machine
            out.update({"snapshot": str(snap.dir), "ram_mb": m.ram_mb, "heap": m.heap,
                        "snapshot_created": snap.meta.get("created"), **self.describe_machine(m)})
        if self.heap_requested and self.heap_requested != out.get("heap"):
            out["note"] = f"heap {self.heap_requested} requested, but the snapshot's JVM has {out.get('heap')}"
        return out

    def describe_own(self) -> dict:
        """This backend's own facts for ``describe`` (its binary, its checks…)."""
        return {}

    def described_snapshot(self):
        """The snapshot ``describe`` reports (None: none; BackendUnavailable: reported as snapshot_error)."""
        return None

    def describe_machine(self, machine) -> dict:
        """What ``describe`` adds about the snapshot's machine beyond RAM and heap."""
        return {}


class ColdBoot(ABC):
    """A VM booted from scratch for ``dhvm prepare``: boot it, reach its agent, save it as a snapshot.

    prepare drives it the same way for every backend (``prepare/snapshot.py``): ``boot``, ``connect``,
    hello and warm-up through an AgentClient, ``save``, ``destroy``. Each backend's own calls (QMP
    migration, Firecracker's snapshot API) live in its subclass.
    """

    console: Path
    """The guest's serial console (kept when a cold boot fails)."""
    vmm_log: Path
    """The VMM's own log."""

    @abstractmethod
    def boot(self) -> None:
        """Start the VMM and the guest."""

    @abstractmethod
    def connect(self, timeout: float) -> socket.socket:
        """A stream to the guest agent (retrying while the VM comes up)."""

    @abstractmethod
    def alive(self) -> bool:
        """True while the VMM process runs."""

    @abstractmethod
    def save(self, work: Path, client: AgentClient) -> dict:
        """Pause the warmed-up guest and write the snapshot's files into ``work``; returns this backend's
        part of the snapshot metadata (format, machine, the input files' stamps, sizes, timings)."""

    @abstractmethod
    def summary(self, meta: dict) -> str:
        """One progress line about the saved snapshot."""

    @abstractmethod
    def destroy(self) -> None:
        """Kill the VMM and remove the cold boot's run directory. Idempotent."""


def kill_vmm(proc: subprocess.Popen | None) -> None:
    """Kill a VMM process that still runs and reap it (None: there is none)."""
    if proc is not None and proc.poll() is None:
        proc.kill()
        proc.wait()


def file_tail(path: Path, lines: int = 20, missing: str = "(none)") -> str:
    """The last ``lines`` lines of a log file, for an error message (``missing`` if it cannot be read)."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return missing


def connect_unix(path: Path, timeout: float, is_alive=lambda: True, what: str = "the agent") -> socket.socket:
    """Connect to a unix socket that ``what`` serves, retrying while it is not there yet.

    Paths longer than the kernel's 108-byte limit are reached through /proc/self/fd.
    """
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        dfd = None
        try:
            target = str(path)
            if len(target) > 100:
                dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
                target = f"/proc/self/fd/{dfd}/{path.name}"
            sock.connect(target)
            return sock
        except (FileNotFoundError, ConnectionRefusedError) as e:
            sock.close()
            last = e
        finally:
            if dfd is not None:
                os.close(dfd)
        if not is_alive():
            raise AgentStartError(f"{what} exited before it listened on {path}")
        if time.monotonic() >= deadline:
            raise AgentStartError(f"{what} did not listen on {path} within {timeout:.0f}s ({last})")
        time.sleep(0.05)


def new_key() -> str:
    """A fresh login key for one instance's Deephaven server (256 bits from the host's generator)."""
    return secrets.token_urlsafe(32)


# -- snapshot metadata, shared by the restoring backends -------------------------------------------

SNAPSHOT_METADATA = "metadata.json"


def file_stamp(path: Path) -> list[int]:
    """Size and mtime of a file a snapshot depends on (cheap to check at every restore)."""
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def snapshot_meta(backend: str, fmt: int, machine, files: dict | None, sizes: dict, **extra) -> dict:
    """The metadata every snapshot records, base or checkpoint, of every backend: whose it is, its format,
    the machine it runs on (a dataclass), the input files' stamps (``file_stamp``), its sizes; ``extra``
    holds the backend's own fields."""
    return {"backend": backend, "format": fmt, "machine": asdict(machine), "files": files, "sizes": sizes, **extra}


def mem_sizes(mem: Path) -> dict:
    """A snapshot's memory file: its size, and what it takes on disk (holes are free)."""
    st = mem.stat()
    return {"mem_bytes": st.st_size, "mem_allocated_bytes": st.st_blocks * 512}


def write_snapshot_metadata(directory: Path, data: dict) -> None:
    """Write metadata.json atomically and last: its presence marks a complete snapshot."""
    tmp = directory / (SNAPSHOT_METADATA + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, directory / SNAPSHOT_METADATA)


def read_snapshot_metadata(directory: Path, backend: str, fmt: int, label: str, hint: str) -> dict:
    """metadata.json of a ``backend`` snapshot in format ``fmt``; BackendUnavailable with ``hint`` otherwise."""
    path = directory / SNAPSHOT_METADATA
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise BackendUnavailable(f"no {label} snapshot under {directory} — {hint}") from None
    except ValueError as e:
        raise BackendUnavailable(f"unreadable snapshot metadata {path} ({e}) — {hint} --rebuild") from None
    if meta.get("format") != fmt or meta.get("backend") != backend:
        raise BackendUnavailable(f"the snapshot under {directory} is not a format-{fmt} {label} snapshot "
                                 f"— {hint} --rebuild")
    return meta


def require_snapshot_files(paths, hint: str) -> None:
    """Every file of a snapshot must be there (metadata.json alone does not make one)."""
    for p in paths:
        if not p.is_file():
            raise BackendUnavailable(f"snapshot file {p} is missing — {hint}")


def check_snapshot_inputs(files: dict, vm_dir: Path, hint: str) -> None:
    """The kernel and disk files a snapshot was taken with must be the very same files now."""
    for rel, stamp in (files or {}).items():
        p = vm_dir / rel
        try:
            now = file_stamp(p)
        except FileNotFoundError:
            raise BackendUnavailable(f"{p} (used by the snapshot) is missing — {hint}") from None
        if now != stamp:
            raise BackendUnavailable(f"{p} changed after the snapshot was taken — {hint}")
