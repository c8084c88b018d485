"""Benchmark checkpoints on the QEMU backend: save time and size of a session holding ~1 GB of
tables, restore -> first result from it against the base snapshot, fork time, and host memory of
four sessions restored from one checkpoint at once (copy-on-write should keep them near one copy).

Usage::

    python bench/bench_checkpoint.py [--config-dir ~/.dhg-test] [--mb 800] [--runs 5]

Checkpoints are written into a DHG_HOME of the bench's own (a temporary directory whose ``vm`` is the
given one's) and removed at the end. Figures are printed, not asserted.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dhg_kernel.session import Session  # noqa: E402

FIRST = "print(1 + 1)"
# Eight double columns: 8 bytes a row each.
LOAD = "from deephaven import empty_table\nbig = empty_table({rows}).update([{cols}])\n" \
       "total = big.view(['A']).sum_by()\nprint(big.size)"


def _median(xs: list[float]) -> str:
    xs = sorted(xs)
    return f"median {statistics.median(xs):6.0f} ms  min {xs[0]:6.0f}  max {xs[-1]:6.0f}  (n={len(xs)})"


def _pss_rss(pid: int) -> tuple[int, int]:
    """Proportional and resident set size of a process, in bytes (shared pages split between sharers)."""
    pss = rss = 0
    for line in open(f"/proc/{pid}/smaps_rollup"):
        if line.startswith("Pss:"):
            pss = int(line.split()[1]) * 1024
        elif line.startswith("Rss:"):
            rss = int(line.split()[1]) * 1024
    return pss, rss


def first_result(home: Path, snapshot: str | None, runs: int) -> list[float]:
    walls = []
    for _ in range(runs):
        t0 = time.perf_counter()
        s = Session(backend="qemu", config_dir=home, **({"start_from": snapshot} if snapshot else {}))
        r = s.execute(FIRST)
        walls.append((time.perf_counter() - t0) * 1000)
        assert r.ok, r.error
        s.stop()
    return walls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config-dir", default=str(Path("~/.dhg-test").expanduser()))
    ap.add_argument("--mb", type=int, default=800, help="MiB of table data the saved session holds")
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    source = Path(args.config_dir).expanduser()
    home = Path(tempfile.mkdtemp(prefix="dhg-bench-ck-"))
    (home / "vm").symlink_to(source / "vm")
    rows = args.mb * 2**20 // 64
    cols = ", ".join(f'"{c} = i * {n}.5"' for n, c in enumerate("ABCDEFGH"))
    print(f"machine: {Path('/proc/cpuinfo').read_text().count('processor')} cores; QEMU/TCG; DHG_HOME vm from {source}")
    try:
        s = Session(backend="qemu", config_dir=home)
        t0 = time.perf_counter()
        r = s.execute(LOAD.format(rows=rows, cols=cols))
        assert r.ok, r.error
        print(f"load: {rows:,} rows x 8 doubles ({args.mb} MiB of columns) in {time.perf_counter() - t0:.1f} s")
        stats = s.stats()
        print(f"guest JVM heap used: {stats.get('heap_used', 0) / 2**20:.0f} MiB")
        t0 = time.perf_counter()
        ck = s.checkpoint("bench")
        save_s = time.perf_counter() - t0
        d = ck.describe()
        timings = ck.meta.get("timings", {})
        print(f"checkpoint save: {save_s:.2f} s (VM paused {timings.get('paused_s')} s for the migration, then "
              f"{timings.get('write_s')} s writing the memory file); size on disk {d['size_mb'] / 1024:.2f} GiB of "
              f"{d['ram_mb']} MiB RAM")
        t0 = time.perf_counter()
        child = s.fork()
        print(f"fork (pause, migrate into a new VM, both resume, handshake): {time.perf_counter() - t0:.2f} s")
        child.stop()
        s.stop()

        base = first_result(home, None, args.runs)
        from_ck = first_result(home, "bench", args.runs)
        print(f"restore -> first result, base snapshot:  {_median(base)}")
        print(f"restore -> first result, checkpoint:     {_median(from_ck)}  "
              f"({statistics.median(from_ck) / statistics.median(base) - 1:+.0%} vs base)")

        # Four sessions from one checkpoint at once, each reading the whole table.
        sessions = [Session(backend="qemu", config_dir=home, start_from="bench") for _ in range(4)]
        errors: list = []

        def run(sess):
            r = sess.execute("from deephaven.pandas import to_pandas\nprint(to_pandas(big.view(['H']).sum_by()))")
            if not r.ok:
                errors.append(r.error)

        t0 = time.perf_counter()
        threads = [threading.Thread(target=run, args=(x,)) for x in sessions]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        print(f"4 restores from one checkpoint at once, each reading the table: {time.perf_counter() - t0:.1f} s "
              f"({len(errors)} failed)")
        pss = rss = 0
        for x in sessions:
            p, r_ = _pss_rss(x.instance.proc.pid)
            pss, rss = pss + p, rss + r_
        print(f"  host memory of the 4 QEMU processes: RSS {rss / 2**30:.2f} GiB (each counts shared pages), "
              f"PSS {pss / 2**30:.2f} GiB (shared pages counted once), vs {d['size_mb'] / 1024:.2f} GiB for one copy")
        for x in sessions:
            x.stop()
    finally:
        # Every VM goes first: their run dirs are reached through home/vm, which the rmtree takes away.
        from dhg_kernel.session import stop_all_sessions

        stop_all_sessions()
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
