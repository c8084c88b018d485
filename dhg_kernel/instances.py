"""Instance bookkeeping under ``DHG_HOME/vm/run/<id>/``: who owns what, and reaping the orphans.

Every VM or agent process is recorded with its owner's pid and each process's start time (so a
recycled pid is never killed by mistake). On every start, instances whose owner is gone are reaped:
their processes killed and their directories removed, so a kill -9 of a kernel leaves nothing
behind after the next start.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .config import Layout

INSTANCE_FILE = "instance.json"
# Resources outside the run dir (network namespaces, jailer cgroups) that destroy() undoes, by the
# "kind" a backend records in info["cleanup"]; a fixed list, so instance.json never names code to run.
CLEANUP_MODULES = {"netns": "dhg_kernel.vm.netns", "jailer": "dhg_kernel.vm.firecracker"}


def proc_start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (from /proc), or None if it is gone.

    A zombie (dead, not yet waited for) counts as gone.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read().decode(errors="replace")
    except OSError:
        return None
    # The command name (field 2) may hold spaces, so split after its ')': then state is first, starttime 20th.
    fields = stat[stat.rindex(")") + 2:].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def alive(pid: int, start_time: int | None) -> bool:
    """True when ``pid`` is running and is the same process that was recorded."""
    now = proc_start_time(pid)
    if now is None:
        return False
    return start_time is None or now == start_time


@dataclass
class ProcessRef:
    """A process an instance owns."""

    pid: int
    start_time: int | None
    role: str = "agent"


@dataclass
class InstanceRecord:
    """What ``instance.json`` holds."""

    id: str
    backend: str
    dir: str
    owner_pid: int
    owner_start_time: int | None
    created: float = field(default_factory=time.time)
    processes: list[ProcessRef] = field(default_factory=list)
    info: dict = field(default_factory=dict)

    def save(self) -> None:
        path = Path(self.dir) / INSTANCE_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        os.replace(tmp, path)

    @classmethod
    def load(cls, directory: Path) -> "InstanceRecord":
        data = json.loads((directory / INSTANCE_FILE).read_text())
        data["processes"] = [ProcessRef(**p) for p in data.get("processes", [])]
        return cls(**data)

    def add_process(self, pid: int, role: str) -> None:
        self.processes.append(ProcessRef(pid, proc_start_time(pid), role))
        self.save()

    @property
    def owner_alive(self) -> bool:
        return alive(self.owner_pid, self.owner_start_time)


def new_instance(layout: Layout, backend: str) -> InstanceRecord:
    """Create ``run/<id>/`` (mode 0700) and its record, owned by this process."""
    layout.private_dir(layout.run)
    iid = f"{backend}-{uuid.uuid4().hex[:10]}"
    d = layout.run / iid
    d.mkdir(mode=0o700)
    rec = InstanceRecord(iid, backend, str(d), os.getpid(), proc_start_time(os.getpid()))
    rec.save()
    # Whatever kills this process, its instances go within moments (see watchdog.py).
    ensure_watchdog(layout)
    return rec


def kill_processes(rec: InstanceRecord, grace: float = 3.0) -> None:
    """SIGTERM then SIGKILL every live process of the instance (and its process group)."""
    live = [p for p in rec.processes if alive(p.pid, p.start_time)]
    for p in live:
        _signal_group(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(alive(p.pid, p.start_time) for p in live):
        time.sleep(0.02)
    for p in live:
        if alive(p.pid, p.start_time):
            _signal_group(p.pid, signal.SIGKILL)
    for p in live:
        _reap_child(p.pid)


def _signal_group(pid: int, sig: int) -> None:
    # Our processes lead their own session (start_new_session), so the group holds their children too.
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
            return
    except OSError:
        pass
    try:
        os.kill(pid, sig)
    except OSError:
        pass


def _reap_child(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
    except OSError:
        pass


def destroy(rec: InstanceRecord) -> None:
    """Kill the instance's processes, undo its recorded external resources, remove its directory."""
    kill_processes(rec)
    for item in rec.info.get("cleanup") or []:
        module = CLEANUP_MODULES.get(item.get("kind")) if isinstance(item, dict) else None
        if module is None:
            continue
        try:
            importlib.import_module(module).cleanup(item)
        except Exception as e:  # noqa: BLE001 - one failed undo must not keep the rest in place
            print(f"dhg: cleanup of {item.get('kind')} for {rec.id} failed: {e}", file=sys.stderr)
    shutil.rmtree(rec.dir, ignore_errors=True)


def reap_stale(layout: Layout) -> list[str]:
    """Destroy instances whose owner process is gone. Returns the ids reaped."""
    reaped: list[str] = []
    if not layout.run.is_dir():
        return reaped
    for d in sorted(layout.run.iterdir()):
        if not d.is_dir():
            continue
        try:
            rec = InstanceRecord.load(d)
        except FileNotFoundError:
            # A directory without a record: a start that died before writing one, if it is old enough.
            if time.time() - d.stat().st_mtime > 60:
                shutil.rmtree(d, ignore_errors=True)
                reaped.append(d.name)
            continue
        except (OSError, ValueError, TypeError):
            shutil.rmtree(d, ignore_errors=True)
            reaped.append(d.name)
            continue
        if not rec.owner_alive:
            destroy(rec)
            reaped.append(rec.id)
    return reaped


def list_instances(layout: Layout) -> list[InstanceRecord]:
    """Every recorded instance (live or stale)."""
    out = []
    if layout.run.is_dir():
        for d in sorted(layout.run.iterdir()):
            try:
                out.append(InstanceRecord.load(d))
            except (OSError, ValueError, TypeError):
                continue
    return out


# -- the owner's watchdog (a process of its own: see watchdog.py) ------------------------------------

_watchers: dict[str, tuple[subprocess.Popen, int, int]] = {}
_lock = threading.Lock()


def ensure_watchdog(layout: Layout) -> subprocess.Popen:
    """Start this process's watchdog (``watchdog.py``) for ``layout`` unless it runs already; returns it."""
    key = str(layout.run)
    with _lock:
        known = _watchers.get(key)
        if known is not None and known[2] == os.getpid() and known[0].poll() is None:
            return known[0]
        read_end, write_end = os.pipe()  # both non-inheritable (PEP 446)
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "dhg_kernel.watchdog", "--home", str(layout.home), "--owner", str(os.getpid())],
                stdin=read_end, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                env={**os.environ, "PYTHONPATH": os.pathsep.join(
                    p for p in (str(Path(__file__).resolve().parent.parent), os.environ.get("PYTHONPATH")) if p)})
        finally:
            os.close(read_end)
        _watchers[key] = (proc, write_end, os.getpid())
        return proc


def reap_owner(layout: Layout, owner_pid: int) -> list[str]:
    """Destroy the instances that ``owner_pid`` owned and that outlived it."""
    # The pipe closes early in the owner's exit, before the process is gone: give it a moment.
    deadline = time.monotonic() + 5
    while alive(owner_pid, None) and time.monotonic() < deadline:
        time.sleep(0.02)
    gone = []
    for rec in list_instances(layout):
        if rec.owner_pid == owner_pid and not rec.owner_alive:
            destroy(rec)
            gone.append(rec.id)
    return gone
