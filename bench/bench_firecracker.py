"""Benchmark the Firecracker backend: restore-to-first-result and per-cell latency (goal ≤ 100 ms).

Usage::

    python bench/bench_firecracker.py [--config-dir ~/.dhg] [--runs 10] [--json]

Needs a host with a working /dev/kvm, a firecracker binary and a snapshot made by
``dhvm prepare --backend firecracker``. Elsewhere it prints that it could not run and every
prerequisite check that failed (with its fix), and exits with status 2.
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
from dhg_kernel.vm.firecracker import FirecrackerBackend  # noqa: E402

TRIVIAL = "print(1 + 1)"
TABLE = 'from deephaven import empty_table\nt = empty_table(100).update(["X = i", "Y = X * 1.5"]).where("X > 3")'
GOAL_MS = 100.0


def _stats(xs: list[float]) -> dict:
    xs = sorted(xs)
    return {"median_ms": round(statistics.median(xs), 1), "min_ms": round(xs[0], 1), "max_ms": round(xs[-1], 1),
            "p90_ms": round(xs[int(0.9 * (len(xs) - 1))], 1), "n": len(xs)}


def restore_to_first_result(home: Path, runs: int) -> tuple[list[float], list[dict]]:
    """A fresh VM per run: wall time from Session creation to the trivial cell's result."""
    from dhg_kernel.session import Session

    walls, parts = [], []
    for _ in range(runs):
        t0 = time.perf_counter()
        s = Session(backend="firecracker", config_dir=home)
        r = s.execute(TRIVIAL)
        walls.append((time.perf_counter() - t0) * 1000)
        assert r.ok, r.error
        parts.append({**s.instance.timings, "cell_ms": r.timings.get("roundtrip_ms")})
        s.stop()
    return walls, parts


def per_cell(home: Path, code: str, runs: int) -> list[float]:
    """One VM: the round trip of the same cell, again and again."""
    from dhg_kernel.session import Session

    s = Session(backend="firecracker", config_dir=home)
    try:
        s.execute(code)
        out = []
        for _ in range(runs):
            t0 = time.perf_counter()
            r = s.execute(code)
            out.append((time.perf_counter() - t0) * 1000)
            assert r.ok, r.error
        return out
    finally:
        s.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config-dir", default=None, help="DHG_HOME holding the Firecracker snapshot")
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    layout = Layout.resolve(args.config_dir)
    backend = FirecrackerBackend(layout)
    checks = backend.checks()
    failed = [c for c in checks if not c.ok]
    if failed:
        out = {"ran": False, "why": {c.name: str(c) for c in failed},
               "passed": {c.name: c.detail for c in checks if c.ok}}
        if args.json:
            print(json.dumps(out, indent=2))
        else:
            print(f"bench_firecracker: could not run on this host ({len(failed)} prerequisite check(s) failed):")
            for c in failed:
                print(f"  FAILED {c.name}: {c}")
            for c in checks:
                if c.ok:
                    print(f"  ok     {c.name}: {c.detail}")
        return 2
    walls, parts = restore_to_first_result(layout.home, args.runs)
    result = {"ran": True, **backend.describe(),
              "restore_to_first_result": _stats(walls), "restore_breakdown_first": parts[0],
              "per_cell_trivial": _stats(per_cell(layout.home, TRIVIAL, args.runs)),
              "per_cell_table": _stats(per_cell(layout.home, TABLE, args.runs))}
    result["per_cell_goal_met"] = result["per_cell_trivial"]["median_ms"] <= GOAL_MS
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    else:
        for k in ("restore_to_first_result", "per_cell_trivial", "per_cell_table"):
            print(f"{k:26s} {result[k]}")
        print(f"per-cell goal ≤ {GOAL_MS:.0f} ms: {'met' if result['per_cell_goal_met'] else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
