"""Issue 21's output figures: what big prints cost the kernel. A real "Deephaven microVM" kernel (through
jupyter_client, local backend unless --backend says otherwise) runs 2000 prints of 100 KB, a 9 MB print
and a 200 MB print; the kernel process's RSS is read from /proc before and after each, and the stdout the
kernel keeps for the cell (``_dhvm.stdout``) is measured. Printed, not asserted.

    python bench/bench_output.py [--backend local|qemu] [--prints 2000]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CELLS = {
    "2000 prints of 100 KB": "for n in range({prints}):\n    print(str(n % 10) * 99_999)",
    "the same, again": "for n in range({prints}):\n    print(str(n % 10) * 99_999)",
    "one 9 MB print": "print('x' * 9_000_000)",
    "one 200 MB print": "print('x' * 200_000_000)",
}

# Freed memory the C allocator still holds is given back, so what remains is what the kernel keeps.
TRIM = "%%local\nimport ctypes, gc\ngc.collect()\nctypes.CDLL('libc.so.6').malloc_trim(0)"


def rss_mb(pid: int) -> float:
    """Resident memory of ``pid`` in MiB (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run(kc, code: str, timeout: float = 900) -> tuple[int, str]:
    """Run a cell; the characters of stream output the client received, and the error name if any."""
    got = [0]
    error = [""]

    def hook(msg):
        if msg["msg_type"] == "stream":
            got[0] += len(msg["content"]["text"])
        elif msg["msg_type"] == "error":
            error[0] = msg["content"]["ename"]

    kc.execute_interactive(code, timeout=timeout, output_hook=hook)
    return got[0], error[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="local")
    ap.add_argument("--prints", type=int, default=2000)
    args = ap.parse_args()
    from jupyter_client.manager import start_new_kernel

    with tempfile.TemporaryDirectory(prefix="dhg-bench-output-") as tmp:
        prefix = Path(tmp) / "prefix"
        subprocess.run([sys.executable, "-m", "dhg_kernel", "kernel", "install", "--prefix", str(prefix)],
                       check=True, capture_output=True)
        env = {**os.environ, "JUPYTER_PATH": str(prefix / "share" / "jupyter"), "DHG_BACKEND": args.backend}
        if args.backend == "local":
            env["DHG_HOME"] = str(Path(tmp) / "home")
        os.environ["JUPYTER_PATH"] = env["JUPYTER_PATH"]
        km, kc = start_new_kernel(kernel_name="dhvm", env=env)
        try:
            pid = km.provisioner.process.pid
            run(kc, "print('warm')")  # the session's server is up before anything is measured
            print(f"kernel pid {pid}, backend {args.backend}, {os.cpu_count()} CPUs")
            print(f"{'cell':<24} {'RSS before':>11} {'RSS after':>10} {'trimmed':>10} {'received':>12} {'kept':>10} "
                  f"{'time':>8}")
            for what, code in CELLS.items():
                before = rss_mb(pid)
                t0 = time.perf_counter()
                got, error = run(kc, code.format(prints=args.prints))
                took = time.perf_counter() - t0
                after = rss_mb(pid)
                kept = []
                kc.execute_interactive("%%local\nprint(len(_dhvm.stdout), _dhvm.stdout_dropped)", timeout=60,
                                       output_hook=lambda m: kept.append(m["content"].get("text", ""))
                                       if m["msg_type"] == "stream" else None)
                kept_chars = "".join(kept).split()[0] if kept else "?"
                run(kc, TRIM)
                trimmed = rss_mb(pid)
                print(f"{what:<24} {before:8.0f} MB {after:7.0f} MB {trimmed:7.0f} MB {got / 1e6:9.1f} MB {kept_chars:>10} "
                      f"{took:6.1f} s" + (f"  ERROR {error}" if error else ""))
        finally:
            kc.stop_channels()
            km.shutdown_kernel(now=False)


if __name__ == "__main__":
    main()
