"""Benchmarks of the vertical slice on the local backend, side by side with pydeephaven (gRPC/Flight)
against the very same Deephaven server. Figures are printed, not asserted.

    .venv/bin/python bench/bench_local.py [--rounds 50]

Goals (issue 2): trivial cell <= 3 ms; 1M x 4 table to pandas <= 1.0x the Flight path;
50 MiB file push <= 0.5 s.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

from dhg_kernel.files import PushFile
from dhg_kernel.session import Session


def timed(fn, rounds: int) -> list[float]:
    out = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1000)
    return out


def fmt(ms: list[float]) -> str:
    return f"median {statistics.median(ms):9.2f} ms   p90 {sorted(ms)[int(len(ms) * 0.9) - 1]:9.2f} ms   (n={len(ms)})"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=50)
    ap.add_argument("--table-rounds", type=int, default=7)
    args = ap.parse_args()

    tmp = tempfile.TemporaryDirectory(prefix="dhg-bench-")  # removed at exit, with the 50 MiB file
    home = Path(tmp.name) / "home"
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"backend local")
    s = Session("local", home, heap="4g")
    t0 = time.perf_counter()
    info = s.start()
    print(f"agent start (JVM + Deephaven + warm-up): {(time.perf_counter() - t0) * 1000:.0f} ms")

    import pydeephaven

    pdh = s.pydeephaven_session()  # logged in with the instance's key

    print("\n1. trivial cell round trip")
    s.execute("x = 1")
    pdh.run_script("x = 1")
    ours = timed(lambda: s.execute("x = 1"), args.rounds)
    flight = timed(lambda: pdh.run_script("x = 1"), args.rounds)
    print(f"   dhvm session.execute('x = 1')     {fmt(ours)}")
    print(f"   pydeephaven run_script('x = 1')   {fmt(flight)}")

    print("\n2. 1M rows x 4 columns to pandas")
    r = s.execute("from deephaven import empty_table\n"
                  "big = empty_table(1_000_000).update(['I = i', 'D = i * 1.5', 'S = `s` + (i % 1000)', 'T = now()'])",
                  max_rows=0)
    assert r.ok, r.error
    ours = timed(lambda: s.fetch("big", None).df, args.table_rounds)
    flight = timed(lambda: pdh.open_table("big").to_arrow().to_pandas(), args.table_rounds)
    print(f"   dhvm fetch + to pandas            {fmt(ours)}")
    print(f"   pydeephaven open_table().to_arrow().to_pandas() {fmt(flight)}")
    print(f"   ratio dhvm / flight: {statistics.median(ours) / statistics.median(flight):.2f}x")

    print("\n3. 50 MiB file push (cell runs after the file is written in the agent's workdir)")
    ws = Path(tmp.name) / "ws"
    ws.mkdir()
    blob = ws / "blob.csv"
    blob.write_bytes(os.urandom(50 * 1024 * 1024))
    pf = PushFile("blob.csv", blob, blob.stat().st_size)

    def push():
        s.pushed.clear()  # force a resend every round
        r = s.execute("import os\nassert os.path.getsize('blob.csv') == 52428800", [pf])
        assert r.ok, r.error

    ms = timed(push, 5)
    print(f"   push 50 MiB + trivial cell        {fmt(ms)}")
    again = timed(lambda: s.execute("pass", [pf]), 5)
    print(f"   same file again (deduplicated)    {fmt(again)}")
    pdh.close()
    s.stop()
    tmp.cleanup()


if __name__ == "__main__":
    main()
