"""Room for a VM before it starts, and the host's out-of-memory killer after one dies.

Free memory is the tightest of two limits: the host's (``MemAvailable``) and the caller's memory
cgroup's (its limit less what it uses, page cache not counted), walking up the cgroup
tree, cgroup v2 (``memory.max``) or v1 (``memory.limit_in_bytes``). A restored VM maps its
snapshot lazily, so it starts small and grows as the guest touches the pages it had when the
snapshot was taken: what a start needs is that resident size (``mem_allocated_bytes`` of the
snapshot's metadata) plus a headroom for the VMM and the first cells. A VMM that died by SIGKILL
while the kernel's OOM kill counters rose (its cgroup's ``memory.events`` / ``memory.oom_control``,
``/proc/vmstat``), or that the kernel log names, was ended by the OOM killer.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import weakref
from dataclasses import dataclass
from pathlib import Path

from ..errors import NotEnoughMemory

# What a start needs on top of the snapshot's resident size (1.48 GiB of its 2.5 GiB here): QEMU's own
# memory and what the guest's cells write beyond the snapshot's pages. Measured here (QEMU, TCG): RSS
# 148 MB right after a restore (36 MB anonymous), 642 MB after a 1M-row table cell. Dhvm.memory_headroom_mb.
DEFAULT_HEADROOM_MB = 384
HEADROOM_ENV = "DHG_MEMORY_HEADROOM_MB"
# A local server's resident size once started (its 2g-heap JVM measured 1022 MB on this project's host).
LOCAL_START_MB = 1024
# cgroup v1 says "no limit" with a number near 2**63.
_NO_LIMIT = 2**60
GiB = 2**30
SMALLER_VM = "a smaller VM: dhvm prepare --ram-mb 2048 --heap 1228m --rebuild"
FREE_MEMORY_FIX = ("free memory by stopping sessions you no longer need (%dhvm sessions lists them; "
                   f"%dhvm -s NAME stop ends one), or use {SMALLER_VM}")


def _gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB"


@dataclass
class Room:
    """How much memory one limit leaves free."""

    free: int
    """Bytes that can still be used under this limit."""
    where: str
    """``host`` or ``cgroup /path``."""
    limit: int | None = None
    used: int | None = None

    def describe(self) -> str:
        if self.limit is None:
            return f"the host has {_gib(self.free)} available (MemAvailable)"
        return (f"{_gib(self.free)} is free under the memory limit of {self.where} ({_gib(self.limit)} limit, "
                f"{_gib(self.used or 0)} in use)")


# -- reading the limits ----------------------------------------------------------------------------


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text == "max":
        return None
    try:
        return int(text)
    except ValueError:
        return None


def _keyed(path: Path) -> dict[str, int]:
    """A ``key value`` file (memory.stat, memory.events, memory.oom_control, /proc/vmstat)."""
    out: dict[str, int] = {}
    try:
        for line in path.read_text().splitlines():
            k, _, v = line.partition(" ")
            if v.strip().isdigit():
                out[k] = int(v)
    except OSError:
        pass
    return out


def host_available() -> Room:
    """MemAvailable from /proc/meminfo."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return Room(int(line.split()[1]) * 1024, "host")
    return Room(0, "host")


@dataclass
class CgroupDir:
    """One memory cgroup directory and the version of its files."""

    path: Path
    name: str
    """The cgroup's path as /proc/PID/cgroup names it."""
    v2: bool

    @property
    def limit(self) -> int | None:
        n = _read_int(self.path / ("memory.max" if self.v2 else "memory.limit_in_bytes"))
        return None if n is None or n >= _NO_LIMIT else n

    @property
    def usage(self) -> int | None:
        return _read_int(self.path / ("memory.current" if self.v2 else "memory.usage_in_bytes"))

    @property
    def reclaimable(self) -> int:
        """Page cache on the file LRUs (snapshot pages a VM mapped among them): the kernel drops these clean
        pages before it kills anything, so they are not what runs a cgroup out of memory."""
        stat = _keyed(self.path / "memory.stat")
        prefix = "" if self.v2 else "total_"
        return stat.get(f"{prefix}active_file", 0) + stat.get(f"{prefix}inactive_file", 0)

    @property
    def oom_kills(self) -> int | None:
        # v2's memory.events counts this cgroup's subtree; v1's oom_control the cgroup's own tasks.
        return _keyed(self.path / ("memory.events" if self.v2 else "memory.oom_control")).get("oom_kill")

    def room(self) -> Room | None:
        limit, usage = self.limit, self.usage
        if limit is None or usage is None:
            return None
        used = max(0, usage - self.reclaimable)
        return Room(max(0, limit - used), f"cgroup {self.name}", limit, used)


def _mounts() -> tuple[tuple[Path, str] | None, tuple[Path, str] | None]:
    """(cgroup2 mount, cgroup v1 memory mount): each its mount point and the cgroup path it shows."""
    v2 = v1 = None
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None, None
    for line in lines:
        left, _, right = line.partition(" - ")
        parts, fs = left.split(), right.split()
        if len(parts) < 5 or len(fs) < 3:
            continue
        if fs[0] == "cgroup2" and v2 is None:
            v2 = (Path(parts[4]), parts[3])
        elif fs[0] == "cgroup" and "memory" in fs[2].split(",") and v1 is None:
            v1 = (Path(parts[4]), parts[3])
    return v2, v1


def memory_cgroup(pid: int | str = "self") -> list[CgroupDir]:
    """The memory cgroup of process ``pid`` and its ancestors, innermost first (empty: none found)."""
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:
        return []
    v2_mount, v1_mount = _mounts()
    found: list[tuple[tuple[Path, str], str, bool]] = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "" and v2_mount:
            found.append((v2_mount, path, True))
        elif "memory" in controllers.split(",") and v1_mount:
            found.append((v1_mount, path, False))
    for (mount, root), path, v2 in found:
        rel = path[len(root):] if root != "/" and path.startswith(root) else path
        here = mount / rel.lstrip("/")
        # A v2 hierarchy without the memory controller has no memory.current: then v1 (if any) holds it.
        if v2 and not (here / "memory.current").exists() and not (here / "memory.stat").exists():
            continue
        chain = []
        name = path
        while True:
            chain.append(CgroupDir(here, name or "/", v2))
            if here == mount or here == here.parent:
                break
            here, name = here.parent, name.rsplit("/", 1)[0]
        return chain
    return []


def free_memory() -> Room:
    """The tightest limit on memory this process can still use: the host's or one of its cgroups'."""
    rooms = [host_available()] + [r for r in (c.room() for c in memory_cgroup()) if r is not None]
    return min(rooms, key=lambda r: r.free)


# -- what a start needs ----------------------------------------------------------------------------


def headroom_mb(setting: int | None = None) -> int:
    """The headroom a start needs beyond the snapshot's size: ``setting``, else $DHG_MEMORY_HEADROOM_MB, else the default."""
    if setting is not None:
        return setting
    try:
        return int(os.environ.get(HEADROOM_ENV, DEFAULT_HEADROOM_MB))
    except ValueError:
        return DEFAULT_HEADROOM_MB


def needed(backend, checkpoint: str | None = None, headroom: int | None = None) -> tuple[int, str]:
    """Bytes a new instance of ``backend`` needs free, and how that figure was made."""
    extra = headroom_mb(headroom) * 2**20
    if backend.name == "local":
        return LOCAL_START_MB * 2**20 + extra, (f"a local Deephaven server's {LOCAL_START_MB} MiB once started "
                                                f"+ {extra >> 20} MiB headroom")
    if backend.base_snapshot() is None:  # (a backend that starts without a snapshot)
        return 0, "unknown"
    snap = backend.snapshot(checkpoint)
    ram = snap.machine.ram_mb * 2**20
    resident = min(ram, int((snap.meta.get("sizes") or {}).get("mem_allocated_bytes") or ram))
    what = f"checkpoint {checkpoint}" if checkpoint else ("the snapshot" if not backend.start_from
                                                          else f"checkpoint {backend.start_from}")
    return resident + extra, (f"{_gib(resident)} that {what} holds in memory + {extra >> 20} MiB headroom; "
                              f"the VM may grow to its {snap.machine.ram_mb} MiB of RAM")


def check_room(backend, checkpoint: str | None = None, headroom: int | None = None) -> None:
    """Refuse (NotEnoughMemory, saying how much is needed, how much is free under which limit, and the fix)
    a start that would not fit in the host's or this process's cgroup's free memory."""
    need, how = needed(backend, checkpoint, headroom)
    if need <= 0:
        return
    room = free_memory()
    if room.free >= need:
        return
    host = "" if room.limit is None else f"; the host has {_gib(host_available().free)} available"
    fix = FREE_MEMORY_FIX if backend.name != "local" else \
        FREE_MEMORY_FIX.replace(SMALLER_VM, "a smaller heap: %config Dhvm.heap = '1g'")
    raise NotEnoughMemory(
        f"not enough memory to start a {backend.name} server: it needs about {_gib(need)} ({how}), but "
        f"{room.describe()}{host}. Nothing was started. To fix it, {fix}; or lower the headroom "
        f"(%config Dhvm.memory_headroom_mb = N, or ${HEADROOM_ENV}) at the risk of the host's OOM killer.")


# -- the OOM killer --------------------------------------------------------------------------------


@dataclass
class _Watch:
    """OOM kill counters seen when a VMM process started, and where to read them again."""

    pid: int
    cgroups: list[CgroupDir]
    before: list[int | None]
    host_before: int | None


_watches: "weakref.WeakKeyDictionary[object, _Watch]" = weakref.WeakKeyDictionary()


def _host_oom_kills() -> int | None:
    return _keyed(Path("/proc/vmstat")).get("oom_kill")


def watch(instance) -> None:
    """Note the OOM kill counters of the instance's process now, so its death can be explained later."""
    proc = getattr(instance, "proc", None)
    if proc is None:
        return
    groups = memory_cgroup(proc.pid)
    _watches[instance] = _Watch(proc.pid, groups, [g.oom_kills for g in groups], _host_oom_kills())


def _kernel_log(pid: int) -> tuple[bool, str | None, str | None]:
    """What the kernel log says about the OOM killer and ``pid``: (readable, the "Killed process" line,
    the memory cgroup whose limit was hit). Unreadable (dmesg restricted): (False, None, None)."""
    try:
        p = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return False, None, None
    if p.returncode != 0:
        return False, None, None
    killed = re.compile(rf"(Out of memory|Memory cgroup out of memory): Killed process {pid} \(.*")
    memcg = re.compile(rf"oom-kill:constraint=CONSTRAINT_MEMCG,.*oom_memcg=([^,]+),.*,pid={pid},")
    line = group = None
    for text in p.stdout.splitlines():
        if m := killed.search(text):
            line = m.group(0)
        elif m := memcg.search(text):
            group = m.group(1)
    return True, line, group if line else None


@dataclass
class Death:
    """Why a VM's process is gone, as far as the host can tell."""

    text: str
    oom: bool
    """True when the host's out-of-memory killer ended it."""

    def __str__(self) -> str:
        return self.text

    def cell_error(self) -> str:
        """A cell's error for it: what happened, what is lost, what to do."""
        fix = f"; {FREE_MEMORY_FIX}" if self.oom else ""
        return f"{self.text}: variables and tables are lost; the next cell starts a fresh server{fix}"

    def told(self) -> str:
        """The cause, with the fix when memory ran out (for the next cell's notice and ``%dhvm sessions``)."""
        return f"{self.text}; {FREE_MEMORY_FIX}" if self.oom else self.text


def death_cause(instance, wait: float = 2.0) -> Death | None:
    """Why the instance's process is gone, when that is known: the host's OOM killer (with the limit it hit),
    or a SIGKILL from elsewhere. None while it runs, or when it exited on its own.
    Call it before the instance is stopped (a stop's own kill would be mistaken for the cause)."""
    proc = getattr(instance, "proc", None)
    if proc is None:
        return None
    try:
        proc.wait(timeout=wait)  # the stream ends a moment before the process is reaped
    except subprocess.TimeoutExpired:
        return None
    if proc.returncode != -signal.SIGKILL:
        return None
    noun = "server" if getattr(instance.record, "backend", "") == "local" else "VM"  # a local one is a plain process
    w = _watches.get(instance)
    readable, line, memcg = _kernel_log(proc.pid)
    # Only the VMM's own cgroup's counter: a v2 ancestor's also counts kills in sibling cgroups.
    own = w.cgroups[0] if w and w.cgroups and w.before[0] is not None else None
    grew = own is not None and (own.oom_kills or 0) > w.before[0]
    host_grew = w is not None and w.host_before is not None and (_host_oom_kills() or 0) > w.host_before
    # The kernel log names the victim's pid; the host-wide counter counts any process's kill, so it is the last resort.
    if not (line or grew or (host_grew and not readable and own is None)):
        return Death(f"the {noun}'s process ({proc.pid}) was killed with SIGKILL from outside this kernel "
                     f"(not by the out-of-memory killer)", False)
    limited = next((g for g in (w.cgroups if w else []) if memcg and g.name == memcg), None) \
        or (next((g for g in w.cgroups if g.limit is not None), None) if grew else None)
    if limited is not None and limited.limit is not None:
        where = f"its cgroup {limited.name} reached its {_gib(limited.limit)} memory limit"
    elif memcg or (line or "").startswith("Memory cgroup"):
        where = f"its memory cgroup {memcg or ''} reached its limit".replace("  ", " ")
    else:
        where = "the host ran out of memory"
    rss = re.search(r"anon-rss:(\d+)kB, file-rss:(\d+)kB", line or "")
    held = f"; the {noun} held {_gib((int(rss.group(1)) + int(rss.group(2))) * 1024)}" if rss else ""
    return Death(f"the host's out-of-memory killer ended this {noun} ({where}{held}; process {proc.pid})", True)
