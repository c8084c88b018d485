"""Issue 9's figures: completion in a fresh VM and a warm one, a display()+matplotlib cell in the VM
and locally, and what the display machinery adds to every cell. Printed, not asserted.

    python bench/bench_rich.py [--runs 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dhg_kernel.config import Layout  # noqa: E402
from dhg_kernel.session import Session  # noqa: E402

PLOT_CELL = """
from IPython.display import HTML
display(HTML("<b>hello</b>"))
import matplotlib.pyplot as plt
plt.plot([1, 2, 3], [3, 1, 2])
"""


def ms(seconds: float) -> str:
    return f"{seconds * 1000:7.0f} ms"


def completion(home: Path, runs: int) -> None:
    print("\n1. completion (Tab) in the VM, qemu/TCG")
    firsts, warms = [], []
    for _ in range(runs):
        s = Session("qemu", home)
        try:
            s.start()
            code = "import os\nos.pa"
            t0 = time.perf_counter()
            r = s.server.request({"op": "complete", "code": code, "cursor_pos": len(code)}, timeout=120)
            firsts.append(time.perf_counter() - t0)
            assert "path" in r["matches"], r
            code = "from deephaven import empty_table\nt = empty_table(1)\nt.upd"
            s.execute(code.rsplit("\n", 1)[0])
            t0 = time.perf_counter()
            s.server.request({"op": "complete", "code": code, "cursor_pos": len(code)}, timeout=120)
            warms.append(time.perf_counter() - t0)
        finally:
            s.stop()
    print(f"   first completion in a fresh VM: median {ms(statistics.median(firsts))} "
          f"(min {ms(min(firsts))}, max {ms(max(firsts))}; goal <= 1 s)")
    print(f"   a later completion (a table's methods): median {ms(statistics.median(warms))} (goal <= 100 ms)")


def plot_cell(backend: str, home: Path, runs: int) -> None:
    s = Session(backend, home)
    try:
        s.start()
        times = []
        for _ in range(runs):
            shown = []
            t0 = time.perf_counter()
            r = s.execute(PLOT_CELL, on_display=shown.append)
            times.append(time.perf_counter() - t0)
            assert r.ok and len(shown) == 2, (r.error, shown)
        print(f"   {backend:<6} display() + a matplotlib figure: median {ms(statistics.median(times))}")
    finally:
        s.stop()


def overhead(runs: int) -> None:
    """What the machinery adds to a cell that displays nothing: begin/end of the outlet, the pyplot
    patch check and an empty figure flush, with matplotlib imported (the VM's normal state)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401

    from dhg_kernel.guest import rich

    n = 10_000
    t0 = time.perf_counter()
    for _ in range(n):
        rich.outlet.begin(lambda h, p: None, 1)
        rich.patch_pyplot()
        rich.flush_figures()
        rich.outlet.end()
    per = (time.perf_counter() - t0) / n
    print(f"\n3. display machinery per cell (nothing displayed), host CPU: {per * 1e6:.1f} µs (goal <= 2 ms)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    home = Path(os.environ.get("DHG_TEST_HOME", "~/.dhg-test")).expanduser()
    from dhg_kernel.prepare import prepare

    prepare(Layout(home), progress=lambda m: print(f"[prepare] {m}", flush=True))
    completion(home, args.runs)
    print("\n2. a cell with display() and a matplotlib figure (warm session)")
    plot_cell("qemu", home, args.runs)
    with tempfile.TemporaryDirectory(prefix="dhg-bench-") as local_home:  # removed afterwards
        plot_cell("local", Path(local_home), args.runs)
    overhead(args.runs)


if __name__ == "__main__":
    main()
