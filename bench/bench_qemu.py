"""Benchmark the QEMU backend: prepare, snapshot size, restore-to-first-result, live-session cells.

Usage::

    python bench/bench_qemu.py [--config-dir ~/.dhg-test] [--runs 10] [--rebuild]

``--rebuild`` times a cold prepare (every phase, minutes); otherwise the phase timings of the last
build are read from ``prepare-state.json`` and prepare only brings things up to date.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dhg_kernel.config import Layout  # noqa: E402
from dhg_kernel.prepare import PHASES, prepare  # noqa: E402
from dhg_kernel.session import Session  # noqa: E402

TRIVIAL = "print(1 + 1)"
TABLE_WARM = 'from deephaven import empty_table\nt = empty_table(100).update(["X = i", "Y = X * 1.5", "S = `s` + X", "T = now()"]).where("X > 3")'
TABLE_NOFORMULA = "from deephaven import empty_table\nt = empty_table(1000)"
# A formula the snapshot never compiled: Deephaven compiles it with javac in the guest, slow under TCG.
# In the live session {i} changes it on every run so that it is always new there too.
TABLE_NEWFORMULA = 'from deephaven import empty_table\nt = empty_table(1000).update(["X = i", "Y = X * 2.{i}7"])'


def _stats(xs: list[float]) -> str:
    xs = sorted(xs)
    return f"median {statistics.median(xs):7.0f} ms  min {xs[0]:7.0f}  max {xs[-1]:7.0f}  (n={len(xs)})"


def restore_to_first_result(home: Path, code: str, runs: int) -> tuple[list[float], list[dict]]:
    """Fresh VM per run: wall time from Session creation to the cell's result, and its breakdown."""
    walls, parts = [], []
    for _ in range(runs):
        t0 = time.perf_counter()
        s = Session(backend="qemu", config_dir=home)
        r = s.execute(code.replace("{i}", "0"))
        walls.append((time.perf_counter() - t0) * 1000)
        assert r.status == "ok", r.error
        parts.append({**s.instance.timings, "hello_ms": s.server.start_ms if s.server else None, "cell_ms": r.timings.get("roundtrip_ms")})
        s.stop()
    return walls, parts


def live_session(home: Path, code: str, runs: int) -> list[float]:
    """One VM: round trip of the same cell (``{i}`` replaced by the run number), again and again."""
    s = Session(backend="qemu", config_dir=home)
    try:
        s.execute(code.replace("{i}", "0"))
        out = []
        for i in range(runs):
            t0 = time.perf_counter()
            r = s.execute(code.replace("{i}", str(i + 1)))
            out.append((time.perf_counter() - t0) * 1000)
            assert r.status == "ok", r.error
        return out
    finally:
        s.stop()


def per_cell(backend: str, home: Path, pool_size: int, runs: int, think_s: float) -> list[float]:
    """Per-cell mode: wall time of each cell (a fresh server each), with ``think_s`` of user reading
    time between cells (when the warm pool restores the next server)."""
    s = Session(backend=backend, config_dir=home, mode="per-cell", pool_size=pool_size)
    try:
        s.execute(TRIVIAL)  # the first cell of a notebook, before anything was warm
        out = []
        for _ in range(runs):
            time.sleep(think_s)
            t0 = time.perf_counter()
            r = s.execute(TRIVIAL)
            out.append((time.perf_counter() - t0) * 1000)
            assert r.status == "ok", r.error
        return out
    finally:
        s.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config-dir", default=str(Path("~/.dhg-test").expanduser()))
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--rebuild", action="store_true", help="time a cold prepare (minutes)")
    ap.add_argument("--think", type=float, default=1.0, help="per-cell: seconds between cells (qemu)")
    ap.add_argument("--local-think", type=float, default=10.0, help="per-cell: seconds between cells (local)")
    ap.add_argument("--skip-local", action="store_true", help="skip the local-backend comparison")
    args = ap.parse_args()
    home = Path(args.config_dir).expanduser()
    layout = Layout(home)

    t0 = time.monotonic()
    snap = prepare(layout, rebuild=args.rebuild, progress=lambda m: print(f"  {m}", file=sys.stderr))
    prep_s = time.monotonic() - t0
    state = json.loads((layout.vm / "prepare-state.json").read_text())
    print("== prepare")
    print(f"  this run: {prep_s:.1f}s ({'cold, --rebuild' if args.rebuild else 'incremental'})")
    print("  last build of each phase: " + ", ".join(f"{p} {state.get(p, {}).get('seconds', '?')}s" for p in PHASES))
    print(f"  sum of phases (cold prepare): {sum(state.get(p, {}).get('seconds', 0) for p in PHASES):.1f}s")
    sizes, timings = snap.meta["sizes"], snap.meta["timings"]
    print("== snapshot")
    print(f"  guest RAM {snap.machine.ram_mb} MB, JVM heap {snap.machine.heap}, accel {snap.machine.accel}")
    print(f"  mem file {sizes['mem_allocated_bytes'] / 2**20:.0f} MB on disk (sparse, {sizes['mem_bytes'] / 2**20:.0f} MB "
          f"apparent); device state {sizes['state_bytes'] / 1024:.0f} KB; root disk "
          f"{sizes['rootfs_allocated_bytes'] / 2**20:.0f} MB")
    print(f"  cold boot to warm agent {timings['cold_boot_s']}s; snapshot written in {timings['snapshot_s']}s")

    for label, code in (("trivial cell", TRIVIAL), ("table, no formula", TABLE_NOFORMULA),
                        ("table, warm-up formulas", TABLE_WARM), ("table, a new formula", TABLE_NEWFORMULA)):
        runs = args.runs if code == TRIVIAL else max(3, args.runs // 3)
        walls, parts = restore_to_first_result(home, code, runs)
        print(f"== restore-to-first-result, {label}: {code.splitlines()[-1][:60]!r}")
        print(f"  {_stats(walls)}")
        for k in ("qmp_ms", "loaded_ms", "resumed_ms", "ready_ms", "hello_ms", "cell_ms"):
            vals = [p[k] for p in parts if p.get(k) is not None]
            if vals:
                print(f"    {k:10s} median {statistics.median(vals):7.1f} ms")
        live = live_session(home, code, args.runs if code != TABLE_NEWFORMULA else max(3, args.runs // 3))
        print(f"  same cell in a live session{' (a new formula each time)' if '{i}' in code else ''}: {_stats(live)}")

    print(f"== per-cell mode, trivial cell, {args.think}s of reading between cells")
    for pool in (0, 1):
        print(f"  qemu,  warm pool {pool}: {_stats(per_cell('qemu', home, pool, args.runs, args.think))}")
    if not args.skip_local:
        import tempfile

        local_tmp = tempfile.TemporaryDirectory(prefix="dhg-bench-local-")
        local_home = Path(local_tmp.name)
        walls = []
        for _ in range(3):
            t0 = time.perf_counter()
            s = Session(backend="local", config_dir=local_home)
            assert s.execute(TRIVIAL).ok
            walls.append((time.perf_counter() - t0) * 1000)
            s.stop()
        print(f"  local: start-to-first-result (no snapshot: JVM + Deephaven start) {_stats(walls)}")
        for pool in (0, 1):
            print(f"  local, warm pool {pool} ({args.local_think}s reading): "
                  f"{_stats(per_cell('local', local_home, pool, 3, args.local_think))}")
        local_tmp.cleanup()


if __name__ == "__main__":
    main()
