"""Benchmark the Firecracker backend.

Usage::

    python bench/bench_firecracker.py --vmm [--firecracker PATH] [--runs 20] [--clones 4] [--ram-mb 128,2560]
                                      [--jailer] [--qemu-home ~/.dhg] [--json]
    python bench/bench_firecracker.py [--config-dir ~/.dhg] [--runs 10] [--json]

``--vmm`` times the VMM itself with a real Firecracker on any /dev/kvm that can create a VM (this
machine's included): the tests' minimal PVH guest (``tests/vm/fcguest.py``, built with binutils) is
cold-booted and snapshotted through the backend's own code, then restored by the backend's
``restore`` (``agent=False``): process start -> API socket answering -> snapshot loaded and resumed,
median of ``--runs``, then ``--clones`` at once. With ``--qemu-home`` (a DHG_HOME with a prepared
QEMU snapshot) the QEMU restore path's device-state load is timed beside it, 5 times. Goal: ≤ 30 ms
from process start to resumed.

Without ``--vmm``: restore-to-first-result and per-cell latency of real Deephaven cells (goal
≤ 100 ms per cell); needs a host whose KVM runs a Linux guest and a snapshot made by
``dhvm prepare --backend firecracker``. Elsewhere it prints every prerequisite check that failed
(with its fix) and exits with status 2.
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
VMM_GOAL_MS = 30.0
ROOT = Path(__file__).resolve().parent.parent


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


# -- the VMM alone, with the minimal guest ----------------------------------------------------------


def _vmm_times(inst) -> dict:
    t = inst.timings
    return {"api_ms": round(t["api_ms"] - t["spawn_ms"], 1), "resumed_ms": round(t["loaded_ms"] - t["spawn_ms"], 1),
            "restore_call_ms": t["loaded_ms"]}


def vmm_bench(args) -> dict:
    """Restore the minimal guest's snapshot again and again with the real binary; see the module doc."""
    import tempfile
    from concurrent.futures import ThreadPoolExecutor

    sys.path.insert(0, str(ROOT / "tests" / "vm"))
    import fcguest

    from dhg_kernel.vm.firecracker import restore
    from dhg_kernel.vm.host import kvm_create_vm

    fc_path = args.firecracker or fcguest.find_firecracker(ROOT)[0]
    ok, kvm = kvm_create_vm()
    why = None if fc_path else fcguest.find_firecracker(ROOT)[1]
    why = why or (None if ok else kvm) or fcguest.tools_missing()
    if why:
        return {"ran": False, "why": why}
    out: dict = {"ran": True, "goal_ms": VMM_GOAL_MS, "runs": args.runs, "clones": args.clones, "sizes": []}
    for ram in [int(x) for x in args.ram_mb.split(",")]:
        with tempfile.TemporaryDirectory(prefix="dhg-bench-fc-") as tmp:
            t0 = time.perf_counter()
            layout, fc, meta = fcguest.make_home(Path(tmp) / "home", ram_mb=ram, fc_path=fc_path)
            made_s = time.perf_counter() - t0
            kw = {"jailer": str(fc.jailer), "jailer_uid": 65534, "jailer_gid": 65534} if args.jailer else {}
            backend = FirecrackerBackend(layout, firecracker=fc_path, **kw)
            snap = backend.base_snapshot()
            launcher = backend.launcher(fc)
            out["firecracker"] = {"path": str(fc.path), "version": ".".join(map(str, fc.version)),
                                  "jailer": bool(args.jailer)}
            single, answered = [], []
            for _ in range(args.runs):
                inst = restore(layout, launcher, snap, agent=False)
                try:
                    single.append(_vmm_times(inst))
                    answered.append(fcguest.guest_refuses(inst.vsock_path) * 1000)
                finally:
                    inst.stop()
            rounds = []
            for _ in range(max(1, args.runs // args.clones)):
                t1 = time.perf_counter()
                with ThreadPoolExecutor(args.clones) as pool:
                    clones = list(pool.map(lambda _: restore(layout, launcher, snap, agent=False), range(args.clones)))
                wall = (time.perf_counter() - t1) * 1000
                try:
                    for c in clones:
                        fcguest.guest_refuses(c.vsock_path)
                    rounds.append({"wall_ms": wall, "each": [_vmm_times(c) for c in clones]})
                finally:
                    for c in clones:
                        c.stop()
            each = [e for r in rounds for e in r["each"]]
            out["sizes"].append({
                "ram_mb": ram, "snapshot_made_s": round(made_s, 2), "vmstate_bytes": meta["sizes"]["vmstate_bytes"],
                "single": {k: _stats([x[k] for x in single]) for k in ("api_ms", "resumed_ms", "restore_call_ms")},
                "guest_answers_ms": _stats(answered),
                "concurrent": {"resumed_ms": _stats([e["resumed_ms"] for e in each]),
                               "all_resumed_wall_ms": _stats([r["wall_ms"] for r in rounds])}})
    if args.qemu_home:
        out["qemu"] = qemu_restore(Path(args.qemu_home).expanduser())
    return out


def qemu_restore(home: Path, runs: int = 5) -> dict:
    """The QEMU backend's restore of its prepared snapshot, timed from the process start (QMP up,
    device state loaded, resumed), with the agent handshake after it for reference."""
    from dhg_kernel.errors import DhvmError
    from dhg_kernel.vm.qemu import QemuBackend

    backend = QemuBackend(Layout.resolve(str(home)))
    times = []
    try:
        for _ in range(runs):
            inst = backend.start()
            try:
                t = inst.timings
                times.append({k: round(t[k] - t["spawn_ms"], 1) for k in ("qmp_ms", "loaded_ms", "resumed_ms",
                                                                           "ready_ms")})
            finally:
                inst.stop()
    except DhvmError as e:
        return {"ran": False, "why": str(e)}
    return {"ran": True, "accel": backend.describe().get("accel"),
            **{k: _stats([x[k] for x in times]) for k in ("qmp_ms", "loaded_ms", "resumed_ms", "ready_ms")}}


def print_vmm(r: dict) -> None:
    if not r["ran"]:
        print(f"bench_firecracker --vmm: could not run here: {r['why']}")
        return
    f = r["firecracker"]
    print(f"Firecracker {f['version']} ({f['path']}){' under the jailer, as uid 65534' if f['jailer'] else ''}; "
          f"minimal PVH guest; medians (min-max) over {r['runs']} restores, then {r['clones']} at once")
    for s in r["sizes"]:
        one, many = s["single"], s["concurrent"]
        print(f"  guest RAM {s['ram_mb']} MiB (snapshot made in {s['snapshot_made_s']} s, vmstate {s['vmstate_bytes']} B)")
        print(f"    process start -> API socket answers   {one['api_ms']['median_ms']:6.1f} ms "
              f"({one['api_ms']['min_ms']}-{one['api_ms']['max_ms']})")
        print(f"    process start -> loaded and resumed   {one['resumed_ms']['median_ms']:6.1f} ms "
              f"({one['resumed_ms']['min_ms']}-{one['resumed_ms']['max_ms']})   goal ≤ {r['goal_ms']:.0f} ms: "
              f"{'met' if one['resumed_ms']['median_ms'] <= r['goal_ms'] else 'NOT met'}")
        print(f"    restore() call, bookkeeping included  {one['restore_call_ms']['median_ms']:6.1f} ms")
        print(f"    guest answers a CONNECT after resume  {s['guest_answers_ms']['median_ms']:6.1f} ms")
        print(f"    {r['clones']} at once: each resumed after       {many['resumed_ms']['median_ms']:6.1f} ms "
              f"(max {many['resumed_ms']['max_ms']}); all {r['clones']} in {many['all_resumed_wall_ms']['median_ms']:.1f} ms")
    q = r.get("qemu")
    if q:
        if not q["ran"]:
            print(f"  QEMU: not run: {q['why']}")
        else:
            print(f"  QEMU restore path ({q['accel']}), medians of 5, from process start: QMP up "
                  f"{q['qmp_ms']['median_ms']} ms, device state loaded {q['loaded_ms']['median_ms']} ms, resumed "
                  f"{q['resumed_ms']['median_ms']} ms (agent handshake done {q['ready_ms']['median_ms']} ms)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config-dir", default=None, help="DHG_HOME holding the Firecracker snapshot")
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--vmm", action="store_true", help="time the VMM alone with the minimal guest (runs here)")
    ap.add_argument("--firecracker", default=None, help="--vmm: the binary (default: as the real-binary tests find it)")
    ap.add_argument("--clones", type=int, default=4, help="--vmm: restores at once")
    ap.add_argument("--ram-mb", default="128,2560", help="--vmm: guest RAM sizes, comma-separated")
    ap.add_argument("--jailer", action="store_true", help="--vmm: every restore under the jailer, as uid 65534")
    ap.add_argument("--qemu-home", default=None, help="--vmm: also time QEMU restores of this DHG_HOME's snapshot")
    args = ap.parse_args(argv)
    if args.vmm:
        if args.runs == 10 and "--runs" not in (argv or sys.argv):
            args.runs = 20
        r = vmm_bench(args)
        if args.json:
            print(json.dumps(r, indent=2, default=str))
        else:
            print_vmm(r)
        return 0 if r["ran"] else 2
    layout = Layout.resolve(args.config_dir)
    backend = FirecrackerBackend(layout)
    checks = backend.checks(run_binary=True)
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
