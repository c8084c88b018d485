"""Data out without the row limit, and data in: ``fetch --to parquet`` of a 1M x 4 table (seconds, and the
host's peak RSS while it runs) beside fetching the same table into pandas, and ``-i`` of a 1M x 4
DataFrame beside the same table coming back out. Figures are printed, not asserted.

    .venv/bin/python bench/bench_fetch.py [--rounds 5] [--qemu] [--config-dir DIR]

``--qemu`` also runs it in a microVM restored from the snapshot under ``--config-dir`` (default
``$DHG_HOME`` or ``~/.dhg``; prepare it first with ``dhvm prepare``). Peak RSS is the host process's
own (``VmHWM``, reset before every run through ``/proc/self/clear_refs``); the server's memory is not in it.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import platform
import re
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from dhg_kernel.files import CellInput
from dhg_kernel.session import Session

BIG = ("from deephaven import empty_table\n"
       "big = empty_table(1_000_000).update(['I = i', 'D = i * 1.5', 'S = `s` + (i % 1000)', 'T = now()'])")
MIB = 2**20


def _status(field: str) -> int:
    """A ``VmRSS``/``VmHWM`` line of /proc/self/status, in bytes."""
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1)) * 1024


def _reset_peak() -> bool:
    """Start a new peak-RSS window (Linux >= 4.0); False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _give_back() -> None:
    """Return freed memory to the OS (Arrow's pool, glibc's heap), so a run's peak is its own."""
    gc.collect()
    pa.default_memory_pool().release_unused()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def measured(fn, rounds: int) -> tuple[list[float], list[int]]:
    """Seconds of each run, and its peak RSS above the RSS it started from (bytes)."""
    secs, peaks = [], []
    for _ in range(rounds):
        _give_back()
        if not _reset_peak():
            print("   (cannot reset VmHWM here: peaks are the process's highest so far)")
        start = _status("VmRSS")
        t0 = time.perf_counter()
        fn()
        secs.append(time.perf_counter() - t0)
        peaks.append(_status("VmHWM") - start)
    return secs, peaks


def line(label: str, secs: list[float], peaks: list[int] | None = None, extra: str = "") -> str:
    peak = f"   peak RSS +{statistics.median(peaks) / MIB:6.0f} MiB" if peaks else ""
    return f"   {label:<44} median {statistics.median(secs):6.3f} s   min {min(secs):6.3f} s{peak}{extra}"


def run(backend: str, home: Path | None, rounds: int, out: Path, args_big: int) -> None:
    print(f"\n== backend {backend}")
    s = Session(backend, home, **({"heap": "4g"} if backend == "local" else {}))
    t0 = time.perf_counter()
    s.start()
    print(f"   server start: {time.perf_counter() - t0:.1f} s")
    try:
        r = s.execute(BIG, max_rows=0)
        assert r.ok, r.error
        for fmt in ("parquet", "arrow"):  # warm both sides once
            s.fetch_to("big", out / f"warm.{fmt}", force=True, progress=False)

        print("1. 1M rows x 4 columns (int, double, string, Instant) out of the server")
        target = out / "big.parquet"
        written = []

        def to_parquet():
            written.append(s.fetch_to("big", target, force=True, progress=False))

        secs, peaks = measured(to_parquet, rounds)
        print(line("fetch --to big.parquet", secs, peaks, f"   {written[-1].bytes / MIB:.1f} MiB file"))
        secs, peaks = measured(lambda: s.fetch_to("big", out / "big.arrow", force=True, progress=False), rounds)
        print(line("fetch --to big.arrow", secs, peaks))
        secs, peaks = measured(lambda: s.fetch_to("big", out / "big.csv", force=True, progress=False), rounds)
        print(line("fetch --to big.csv", secs, peaks))
        secs, peaks = measured(lambda: s.fetch("big", None).df, rounds)
        print(line("fetch into pandas (what -o does)", secs, peaks))

        print("2. a 1M x 4 DataFrame in (-i) and the same table out")
        n = 1_000_000
        df = pd.DataFrame({"I": np.arange(n, dtype="int64"), "D": np.arange(n) * 1.5,
                           "S": pd.array([f"s{i % 1000}" for i in range(n)], dtype="string"),
                           "T": pd.Timestamp("2024-01-01", tz="UTC") + pd.to_timedelta(np.arange(n), unit="s")})
        sizes = []

        def send_in():
            inp = CellInput.of("df", "inp", df)
            sizes.append(inp.size)
            res = s.execute("n_in = inp.size", inputs=[inp], max_rows=0)
            assert res.ok, res.error

        secs, peaks = measured(send_in, rounds)
        print(line("-i df (encode + send + bind as a table)", secs, peaks, f"   {sizes[-1] / MIB:.1f} MiB payload"))
        secs, peaks = measured(lambda: s.fetch("inp", None).df, rounds)
        print(line("the same table out into pandas", secs, peaks))
        secs, peaks = measured(lambda: s.fetch_to("inp", out / "inp.parquet", force=True, progress=False), rounds)
        print(line("the same table out, fetch --to inp.parquet", secs, peaks))
        s.execute("del inp, n_in")

        print(f"3. {args_big:,} rows x 4 columns: does the host's peak grow with the table?")
        r = s.execute(BIG.replace("1_000_000", str(args_big)).replace("big =", "bigger ="), max_rows=0)
        assert r.ok, r.error
        big_rounds = max(1, rounds // 2)
        secs, peaks = measured(lambda: s.fetch_to("bigger", out / "bigger.parquet", force=True, progress=False),
                               big_rounds)
        print(line("fetch --to bigger.parquet", secs, peaks))
        secs, peaks = measured(lambda: s.fetch_to("bigger", out / "bigger.arrow", force=True, progress=False),
                               big_rounds)
        print(line("fetch --to bigger.arrow", secs, peaks))
        secs, peaks = measured(lambda: s.fetch("bigger", None).df, big_rounds)
        print(line("fetch into pandas", secs, peaks))
    finally:
        s.stop()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--big-rows", type=int, default=5_000_000, help="rows of the larger table (part 3)")
    ap.add_argument("--qemu", action="store_true", help="also in a QEMU microVM (needs a prepared snapshot)")
    ap.add_argument("--config-dir", default=None, help="DHG_HOME of the prepared snapshot, for --qemu")
    args = ap.parse_args()

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
          f"host RSS at start {_status('VmRSS') / MIB:.0f} MiB")
    with tempfile.TemporaryDirectory(prefix="dhg-bench-fetch-") as tmp:
        out = Path(tmp) / "out"
        out.mkdir()
        run("local", Path(tmp) / "home", args.rounds, out, args.big_rows)
        if args.qemu:
            run("qemu", Path(args.config_dir).expanduser() if args.config_dir else None, args.rounds, out,
                args.big_rows)


if __name__ == "__main__":
    main()
