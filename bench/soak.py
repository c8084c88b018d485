"""The outside probe's long scenarios, kept as a script that prints what held (issue 8).

    python bench/soak.py [--backend qemu|local] [--cells 700] [--kernels 4] [--minutes 10]

1. soak: many mixed cells in one session (tables, a pushed file rewritten in place, completions,
   errors); the VM's and the agent's memory sampled every 50 cells, and the slope printed;
2. concurrency: several sessions running cells at once, each checking its own state;
3. faults: the agent exiting, SIGKILLed and OOM-killed inside the VM (time until the cell ends),
   and the owner killed with -9 (time until its VM is gone);
4. clock: the guest's clock against the host's over a loaded session of ``--minutes``.

Figures, not assertions: a failure is printed as such and the script exits 1 at the end.
Uses ``$DHG_TEST_HOME`` (default ~/.dhg-test), prepared as the tests do.
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dhg_kernel.config import Layout  # noqa: E402
from dhg_kernel.files import PushFile  # noqa: E402
from dhg_kernel.instances import alive  # noqa: E402
from dhg_kernel.session import Session  # noqa: E402

failures: list[str] = []


def check(ok: bool, what: str) -> bool:
    if not ok:
        failures.append(what)
        print(f"   FAILED: {what}", flush=True)
    return ok


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def slope_per_100(points: list[tuple[int, float]]) -> float:
    """Least-squares slope of (cell, MB) in MB per 100 cells."""
    if len(points) < 2:
        return float("nan")
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs) or 1
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den * 100


def soak(backend: str, home: Path, cells: int) -> None:
    print(f"\n1. soak: {cells} mixed cells in one {backend} session", flush=True)
    work = Path(tempfile.mkdtemp(prefix="dhg-soak-"))
    atexit.register(shutil.rmtree, work, True)  # the pushed data file goes with the run
    data = work / "data.csv"
    s = Session(backend, home)
    vm_points, agent_points, errors_ok, t0 = [], [], 0, time.monotonic()
    try:
        s.execute("from deephaven import empty_table\nacc = 0")
        first_instance = s.instance.id
        for i in range(cells):
            kind = i % 7
            if kind == 0:
                r = s.execute(f"acc += 1\nt = empty_table({100 + i % 50}).update(['X = i', 'Y = X * 2'])")
                check(r.ok and r.tables and r.tables[0].rows == 100 + i % 50, f"cell {i}: table")
            elif kind == 1:
                data.write_text(f"v\n{i}\n")  # rewritten in place, same name
                r = s.execute("print(open('data.csv').read().split()[1])", [PushFile("data.csv", data, data.stat().st_size)])
                check(r.ok and r.stdout.strip() == str(i), f"cell {i}: pushed file content is the newest")
            elif kind == 2:
                r = s.execute("raise ValueError('on purpose')")
                errors_ok += r.error is not None and r.error.name == "ValueError"
            elif kind == 3:
                s.complete("t.upd", 5)
                r = s.execute("acc += 1")
                check(r.ok, f"cell {i}: after a completion")
            else:
                r = s.execute("acc += 1\nacc")
                check(r.ok, f"cell {i}: trivial")
            if i % 50 == 0 or i == cells - 1:
                st = s.stats()
                pid = getattr(s.instance, "proc", None)
                if pid is not None:
                    vm_points.append((i, rss_mb(pid.pid)))
                agent_points.append((i, st.get("max_rss_bytes", 0) / 2**20))
        check(s.instance.id == first_instance, "one VM for the whole soak (no silent replacement)")
        r = s.execute("print(acc)")
        expected = sum(1 for i in range(cells) if i % 7 not in (1, 2))
        check(r.stdout.strip() == str(expected + 0), f"state kept across {cells} cells (acc {r.stdout.strip()} vs {expected})")
    finally:
        s.stop()
    secs = time.monotonic() - t0
    print(f"   {cells} cells in {secs:.0f} s ({secs / cells * 1000:.0f} ms each), {errors_ok} expected errors reported")
    if vm_points:
        print(f"   VMM RSS {vm_points[0][1]:.0f} -> {vm_points[-1][1]:.0f} MB, slope {slope_per_100(vm_points):+.1f} MB/100 cells")
    print(f"   agent max RSS {agent_points[0][1]:.0f} -> {agent_points[-1][1]:.0f} MB, "
          f"slope {slope_per_100(agent_points):+.1f} MB/100 cells")


def concurrency(backend: str, home: Path, kernels: int, cells: int = 25) -> None:
    print(f"\n2. concurrency: {kernels} sessions x {cells} cells at once", flush=True)
    results: dict[int, str] = {}

    def one(k: int) -> None:
        s = Session(backend, home)
        try:
            s.execute(f"mine = {k}")
            for i in range(cells):
                r = s.execute("mine += 0\nprint(mine)")
                if not (r.ok and r.stdout.strip() == str(k)):
                    results[k] = f"cell {i}: {r.stdout!r} {r.error}"
                    return
            results[k] = "ok"
        except Exception as e:  # noqa: BLE001
            results[k] = f"{type(e).__name__}: {e}"
        finally:
            s.stop()

    t0 = time.monotonic()
    threads = [threading.Thread(target=one, args=(k,)) for k in range(kernels)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ok = sum(v == "ok" for v in results.values())
    print(f"   {ok}/{kernels} sessions kept their own state through {cells} cells ({time.monotonic() - t0:.0f} s)")
    for k, v in results.items():
        check(v == "ok", f"session {k}: {v}")


def faults(backend: str, home: Path) -> None:
    print("\n3. faults", flush=True)
    cases = [("agent exits", "import os\nos._exit(1)"),
             ("agent SIGKILLed", "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)")]
    if backend != "local":
        cases.append(("guest OOM killer", "hog = []\nwhile True:\n    hog.append(b'x' * (128 << 20))"))
    for name, code in cases:
        s = Session(backend, home)
        try:
            s.execute("x = 1")
            t0 = time.monotonic()
            r = s.execute(code, timeout=300)
            took = time.monotonic() - t0
            said = (r.error.value if r.error else "").split(". ")[0]
            check(r.error is not None and r.error.name == "AgentDied", f"{name}: {r.error}")
            nxt = s.execute("print('x' in globals())")
            check(nxt.stdout.strip() == "False", f"{name}: the next cell runs in a fresh VM")
            print(f"   {name:<18} cell ended after {took:5.1f} s: {said}")
        finally:
            s.stop()
    owner = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from dhg_kernel.session import Session
        s = Session({backend!r}, sys.argv[1])
        s.start()
        print(s.instance.dir, s.instance.record.processes[0].pid, flush=True)
        time.sleep(600)
    """)
    p = subprocess.Popen([sys.executable, "-c", owner, str(home)], stdout=subprocess.PIPE, text=True)
    line = p.stdout.readline().split()
    inst_dir, pid = Path(line[0]), int(line[1])
    p.kill()
    p.wait()
    t0 = time.monotonic()
    while time.monotonic() - t0 < 30 and (alive(pid, None) or inst_dir.exists()):
        time.sleep(0.05)
    gone = not alive(pid, None) and not inst_dir.exists()
    check(gone, "kill -9 of the owner: its instance is gone within 30 s")
    print(f"   owner kill -9       instance gone after {time.monotonic() - t0:5.1f} s")


def clock(backend: str, home: Path, minutes: float) -> None:
    print(f"\n4. clock over a loaded {minutes:g}-minute session", flush=True)
    s = Session(backend, home)
    skews: list[float] = []
    cell = textwrap.dedent("""
        import time
        end = time.monotonic() + 20
        while time.monotonic() < end:
            sum(i * i for i in range(5000))
        print(time.time_ns(), flush=True)
    """)
    try:
        end = time.monotonic() + minutes * 60
        while time.monotonic() < end:
            got: list[tuple[int, int]] = []

            def on_stdout(text: str) -> None:
                if text.strip():
                    got.append((int(text.split()[0]), time.time_ns()))

            s.execute(cell, on_stdout=on_stdout)
            if got:
                skews.append((got[0][0] - got[0][1]) / 1e6)
        st = s.stats()
    finally:
        s.stop()
    worst = max(skews, key=abs) if skews else float("nan")
    print(f"   {len(skews)} readings; guest - host: median {statistics.median(skews):+.1f} ms, worst {worst:+.1f} ms; "
          f"clock steps {st.get('clock_steps')}, largest correction {st.get('clock_max_skew_ms')} ms")
    check(abs(worst) < 50, f"clock within 50 ms of the host (worst {worst:+.1f} ms)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="qemu", choices=["qemu", "local", "firecracker"])
    ap.add_argument("--cells", type=int, default=700)
    ap.add_argument("--kernels", type=int, default=4)
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--only", choices=["soak", "concurrency", "faults", "clock"])
    args = ap.parse_args()
    if args.backend == "local":
        home = Path(tempfile.mkdtemp(prefix="dhg-soak-home-"))
        atexit.register(shutil.rmtree, home, True)
    else:
        home = Path(os.environ.get("DHG_TEST_HOME", "~/.dhg-test")).expanduser()
        if args.backend == "qemu":
            from dhg_kernel.prepare import prepare

            prepare(Layout(home), progress=lambda m: print(f"[prepare] {m}", flush=True))
    print(f"backend {args.backend}, DHG_HOME {home}, {os.cpu_count()} cores")
    steps = {"soak": lambda: soak(args.backend, home, args.cells),
             "concurrency": lambda: concurrency(args.backend, home, args.kernels),
             "faults": lambda: faults(args.backend, home),
             "clock": lambda: clock(args.backend, home, args.minutes)}
    for name, step in steps.items():
        if args.only in (None, name):
            step()
    print(f"\n{'all held' if not failures else f'{len(failures)} FAILED'}")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
