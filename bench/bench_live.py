"""Issue 11's live-view figure: a row appended in the server -> its update_display_data on the kernel's
iopub channel, through a real "Deephaven microVM" kernel (jupyter_client), at the default rate
(2 updates/s). Printed, not asserted.

    python bench/bench_live.py [--backend local|qemu] [--rows 20]

The row is written by a cell (a DynamicTableWriter), which prints the server's clock when it wrote
it; the latency is the host's clock when the view's update carrying that row arrived, minus that.
(A VM's clock follows the host's: the agent is sent the host's time every second.)
"""

from __future__ import annotations

import argparse
import os
import queue
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SETUP = """from deephaven import DynamicTableWriter
import deephaven.dtypes as dht
import time
writer = DynamicTableWriter({"N": dht.int64})
feed = writer.table
feed"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backend", default="local", choices=["local", "qemu"])
    ap.add_argument("--config-dir", default=None, help="DHG_HOME (qemu: a prepared one; default ~/.dhg-test)")
    ap.add_argument("--rows", type=int, default=20)
    args = ap.parse_args()
    from jupyter_client.manager import start_new_kernel

    home = args.config_dir or (str(Path("~/.dhg-test").expanduser()) if args.backend == "qemu"
                               else tempfile.mkdtemp(prefix="dhg-bench-live-"))
    prefix = tempfile.mkdtemp(prefix="dhg-bench-kspec-")
    subprocess.run([sys.executable, "-m", "dhg_kernel", "kernel", "install", "--prefix", prefix], check=True,
                   capture_output=True)
    os.environ["JUPYTER_PATH"] = str(Path(prefix) / "share" / "jupyter")
    env = {**os.environ, "DHG_HOME": home, "DHG_BACKEND": args.backend}
    km, kc = start_new_kernel(kernel_name="dhvm", env=env, startup_timeout=300)
    try:
        reply = kc.execute_interactive(SETUP, timeout=600, output_hook=lambda m: None)
        assert reply["content"]["status"] == "ok", reply["content"]
        time.sleep(2)
        while True:  # drain what came before
            try:
                kc.get_iopub_msg(timeout=0.5)
            except queue.Empty:
                break
        lat = []
        for n in range(1, args.rows + 1):
            time.sleep(random.uniform(0.2, 1.2))  # land at any point of the update cycle
            kc.execute(f"writer.write_row({n}); print(time.time())")
            written = arrived = None
            deadline = time.monotonic() + 30
            while arrived is None and time.monotonic() < deadline:
                msg = kc.get_iopub_msg(timeout=30)
                c = msg["content"]
                if msg["msg_type"] == "stream" and written is None:
                    written = float(c["text"].split()[0])
                elif msg["msg_type"] == "update_display_data":
                    m = re.search(r"data-rows='(\d+)'", c["data"].get("text/html", ""))
                    if m and int(m.group(1)) >= n:
                        arrived = time.time()
            if written is None or arrived is None:
                raise SystemExit(f"row {n}: no update arrived (written={written})")
            lat.append(arrived - written)
        q = statistics.quantiles(lat, n=10)
        print(f"live view on {args.backend}: row written in the server -> update_display_data on iopub, "
              f"{len(lat)} rows")
        print(f"   median {statistics.median(lat) * 1000:.0f} ms, p10 {q[0] * 1000:.0f} ms, p90 {q[-1] * 1000:.0f} ms, "
              f"max {max(lat) * 1000:.0f} ms (goal: median <= 1.5 s; Deephaven's update cycle is 1 s)")
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
        shutil.rmtree(prefix, ignore_errors=True)
        if not args.config_dir and args.backend == "local":
            shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
