"""Low memory: a start that would not fit is refused, a VM the host's OOM killer ends is named as such,
and ``%dhvm sessions`` never says "running" about a dead VM.

The sessions run in a small Python driver moved into a memory cgroup of the test's own (cgroup v2
``memory.max``, or v1 ``memory.limit_in_bytes`` where v2 has no memory controller, as on this
project's CI host), so the limit, and the OOM killer that enforces it, are the kernel's real ones.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dhg_kernel.vm import memory

ROOT = Path(__file__).resolve().parents[2]

# Runs in the cgroup: steps given as JSON; prints one JSON line of what it saw per step.
DRIVER = r'''
import json, os, sys, time, threading
cgroup, home, backend, steps = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
with open(os.path.join(cgroup, "cgroup.procs"), "w") as fh:
    fh.write(str(os.getpid()))  # everything started from here (VMs, watchdog) is in the cgroup too
from dhg_kernel.session import Session
from dhg_kernel.errors import DhvmError
from dhg_kernel.instances import list_instances
from dhg_kernel.vm import memory

def say(**kw):
    print(json.dumps(kw), flush=True)

s = Session(backend, home, **({"heap": "1g"} if backend == "local" else {}))
for step in steps:
    op = step["op"]
    if op == "headroom":
        s.memory_headroom_mb = step["mb"]
    elif op in ("limit", "squeeze"):  # the cgroup's limit: what it uses now + (for limit) a start's need + extra MiB
        need, _ = memory.needed(s.backend, None, getattr(s, "memory_headroom_mb", None))
        used = memory.memory_cgroup()[0].usage
        limit = used + (need if op == "limit" else 0) + step["extra_mb"] * 2**20
        name = "memory.max" if os.path.exists(os.path.join(cgroup, "memory.max")) else "memory.limit_in_bytes"
        with open(os.path.join(cgroup, name), "w") as fh:
            fh.write(str(limit))
        say(op=op, need=need, used=used, limit=limit)
    elif op == "start":
        try:
            s.start()
            inst = s.server.instance
            say(op=op, ok=True, id=inst.id, dir=str(inst.dir), pid=inst.proc.pid)
        except DhvmError as e:
            mine = [r.id for r in list_instances(s.layout) if r.owner_pid == os.getpid()]
            say(op=op, ok=False, error=str(e), kind=type(e).__name__, instances=mine)
    elif op == "cell":
        r = s.execute(step["code"])
        say(op=op, id=s.server.instance.id if s.server else None, stdout=r.stdout, stderr=r.stderr,
            error=None if r.error is None else {"name": r.error.name, "value": r.error.value})
    elif op == "wait_dead":  # the VM dies while idle (no request in flight)
        inst = s.server.instance
        deadline = time.monotonic() + step["timeout"]
        while inst.alive() and time.monotonic() < deadline:
            time.sleep(0.2)
        say(op=op, dead=not inst.alive())
    elif op == "kill":
        os.kill(s.server.instance.proc.pid, 9)
    elif op == "summary":
        say(op=op, **s.summary())
    elif op == "stop":
        s.stop()
        say(op=op)
'''


def _mount() -> tuple[Path, bool]:
    """Where memory cgroups of the test's own can be made, and whether that is cgroup v2."""
    if os.geteuid() != 0:
        pytest.skip("making a memory cgroup needs root")
    v2, v1 = memory._mounts()
    if v2 and "memory" in (v2[0] / "cgroup.controllers").read_text().split():
        return v2[0], True
    if v1:
        return v1[0], False
    pytest.skip("no memory cgroup controller on this host (neither cgroup v2's nor v1's)")


@pytest.fixture
def cgroup():
    """An empty memory cgroup (no limit yet), removed after the test; the test fails if a process outlives it."""
    mount, v2 = _mount()
    if v2 and "memory" not in (mount / "cgroup.subtree_control").read_text().split():
        (mount / "cgroup.subtree_control").write_text("+memory")
    path = mount / f"dhgtest-{os.getpid()}-{time.monotonic_ns()}"
    path.mkdir()
    yield path
    procs = path / "cgroup.procs"
    deadline = time.monotonic() + 15  # the driver's watchdog leaves once its owner is gone
    while procs.read_text().split() and time.monotonic() < deadline:
        time.sleep(0.1)
    left = procs.read_text().split()
    for pid in left:  # ours: everything in this cgroup was started by the test's driver
        os.kill(int(pid), signal.SIGKILL)
    time.sleep(0.5)
    path.rmdir()
    assert not left, f"processes left in the test's cgroup after its driver ended: {left}"


def drive(cgroup: Path, home: Path, backend: str, steps: list[dict], timeout: float = 900) -> list[dict]:
    """Run the steps in a driver process inside ``cgroup``; returns what each step printed."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "-c", DRIVER, str(cgroup), str(home), backend, json.dumps(steps)],
                       capture_output=True, text=True, timeout=timeout, env=env)
    seen = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
    assert p.returncode == 0, f"the driver (the 'kernel') died: rc={p.returncode}\n{p.stderr[-3000:]}\n{seen}"
    return seen


def _gone(pid: int) -> bool:
    """True when ``pid`` is neither running nor a zombie waiting to be reaped."""
    return not Path(f"/proc/{pid}").exists()


# -- local backend: the same checks, in seconds ------------------------------------------------------------


def test_local_start_refused_when_cgroup_too_small(cgroup, dhg_home):
    """A local server that would not fit under the cgroup's limit is refused, saying needed, free, which
    limit, and the fix; nothing is started."""
    seen = drive(cgroup, dhg_home, "local", [{"op": "limit", "extra_mb": -400}, {"op": "start"}])
    limit, start = seen
    assert not start["ok"] and start["kind"] == "NotEnoughMemory", start
    msg = start["error"]
    assert f"needs about {limit['need'] / 2**30:.2f} GiB" in msg
    assert f"free under the memory limit of cgroup /{cgroup.name}" in msg
    assert "%dhvm sessions" in msg and "%config Dhvm.heap = '1g'" in msg
    assert start["instances"] == [], "a refused start left an instance behind"


def test_local_kill9_shows_dead_in_sessions(cgroup, dhg_home):
    """A server killed with kill -9 while idle: sessions says not running and why; the next cell says a
    fresh server took its place, and the dead one is reaped."""
    seen = drive(cgroup, dhg_home, "local", [
        {"op": "start"}, {"op": "kill"}, {"op": "wait_dead", "timeout": 10}, {"op": "summary"},
        {"op": "cell", "code": "print(6 * 7)"}, {"op": "stop"}])
    start, dead, summary, cell = seen[0], seen[1], seen[2], seen[3]
    assert dead["dead"]
    assert summary["running"] is False, summary
    assert "killed with SIGKILL from outside" in summary["ended"], summary
    assert "lost since the last cell (the server's process" in cell["stderr"] and cell["stdout"] == "42\n", cell
    assert cell["id"] != start["id"]
    assert _gone(start["pid"]) and not Path(start["dir"]).exists()


# -- QEMU: real VMs --------------------------------------------------------------------------------------


def test_qemu_start_refused_when_cgroup_too_small(cgroup, qemu_home):
    """A VM that would not fit is refused before QEMU starts, with needed, free (cgroup), and the fix."""
    seen = drive(cgroup, qemu_home, "qemu", [{"op": "limit", "extra_mb": -300}, {"op": "start"}])
    limit, start = seen
    assert not start["ok"] and start["kind"] == "NotEnoughMemory", start
    msg = start["error"]
    assert f"needs about {limit['need'] / 2**30:.2f} GiB" in msg and "holds in memory" in msg
    assert f"free under the memory limit of cgroup /{cgroup.name}" in msg
    assert "%dhvm -s NAME stop" in msg and "dhvm prepare --ram-mb" in msg
    assert start["instances"] == [], "a refused start left an instance behind"


# The guest allocates (and touches) memory: within its RAM, beyond what the cgroup leaves QEMU.
ALLOCATE = ("import threading, time\nheld = []\ndef grow():\n    for _ in range({n}):\n"
            "        held.append(bytearray(b'x') * (64 * 2**20))\n        time.sleep(0.05)\n")


def test_qemu_oom_killed_vm_is_named_and_replaced(cgroup, qemu_home):
    """The host's OOM killer ends a VM, first while idle, then during a cell: sessions shows it dead with why,
    the next cell says so and runs on a fresh VM, the cell that was running names the OOM killer, the
    driver (the kernel) survives, and each dead QEMU is reaped with its run dir."""
    # 1 GiB: within what the guest has free (1.19 GiB after a restore here), beyond what the squeezed cgroup
    # leaves QEMU (300 MiB over its use, plus the snapshot's page cache, which is dropped first).
    grow = ALLOCATE.format(n=16)
    fits = {"op": "limit", "extra_mb": 64}  # room for one more VM (the start check passes)
    squeeze = {"op": "squeeze", "extra_mb": 300}
    seen = drive(cgroup, qemu_home, "qemu", [
        {"op": "headroom", "mb": 64}, fits, {"op": "start"}, squeeze,
        {"op": "cell", "code": grow + "threading.Thread(target=grow, daemon=True).start()\nprint('started')"},
        {"op": "wait_dead", "timeout": 300}, {"op": "summary"},
        fits, {"op": "cell", "code": "print(6 * 7)"}, {"op": "summary"},
        squeeze, {"op": "cell", "code": grow + "grow()\nprint('survived')"}, {"op": "summary"},
        fits, {"op": "cell", "code": "print(6 * 9)"}, {"op": "stop"}])
    limits = [x for x in seen if x["op"] in ("limit", "squeeze")]
    first, bg, dead, idle_summary, after_idle, running, oom_cell, cell_summary, last = \
        [x for x in seen if x["op"] not in ("limit", "squeeze", "stop")]
    assert len(limits) == 5
    assert first["ok"], first
    assert bg["error"] is None and bg["stdout"] == "started\n", bg
    assert dead["dead"], "the cgroup's OOM killer never ended the VM"
    assert idle_summary["running"] is False, idle_summary
    assert "out-of-memory killer ended this VM" in idle_summary["ended"], idle_summary
    assert f"cgroup /{cgroup.name} reached its" in idle_summary["ended"]
    assert "out-of-memory killer" in after_idle["stderr"] and "fresh VM" in after_idle["stderr"], after_idle
    assert after_idle["stdout"] == "42\n" and after_idle["id"] != first["id"]
    assert running["running"] is True
    err = oom_cell["error"]
    assert err and err["name"] == "AgentDied", oom_cell
    assert err["value"].startswith("the host's out-of-memory killer ended this VM (")
    assert "variables and tables are lost; the next cell starts a fresh server; free memory by" in err["value"]
    assert cell_summary["running"] is False and cell_summary["ended"] == err["value"], cell_summary
    assert last["stdout"] == "54\n" and last["id"] not in (first["id"], after_idle["id"]), last
    for gone in (first, after_idle):
        run_dir = qemu_home / "vm" / "run" / gone["id"]
        assert not run_dir.exists(), f"{run_dir} outlived its VM"
