"""Ends a process's instances within moments of its death, however it dies (kill -9 included).

One small helper per owner process and DHG_HOME. It holds the read end of a pipe whose write end
only the owner holds (non-inheritable, so no VM or agent keeps it open). When the owner dies the
kernel closes that end; the helper reads end-of-file and destroys every instance the owner
recorded, then exits. It runs in its own session, so a signal to the owner's process group (as
Jupyter sends when it kills a kernel) does not take it down before it has cleaned up.
Started by ``instances.new_instance``; ``python -m dhg_kernel.watchdog`` is its entry point.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
from pathlib import Path

from .config import Layout

_watchers: dict[str, tuple[subprocess.Popen, int, int]] = {}
_lock = threading.Lock()


def ensure_watchdog(layout: Layout) -> subprocess.Popen:
    """Start this process's watchdog for ``layout`` unless it runs already; returns it."""
    key = str(layout.run)
    with _lock:
        known = _watchers.get(key)
        if known is not None and known[2] == os.getpid() and known[0].poll() is None:
            return known[0]
        read_end, write_end = os.pipe()  # both non-inheritable (PEP 446)
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "dhg_kernel.watchdog", "--home", str(layout.home), "--owner", str(os.getpid())],
                stdin=read_end, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                env={**os.environ, "PYTHONPATH": os.pathsep.join(
                    p for p in (str(Path(__file__).resolve().parent.parent), os.environ.get("PYTHONPATH")) if p)})
        finally:
            os.close(read_end)
        _watchers[key] = (proc, write_end, os.getpid())
        return proc


def reap_owner(layout: Layout, owner_pid: int) -> list[str]:
    """Destroy the instances that ``owner_pid`` owned and that outlived it."""
    import time

    from .instances import alive, destroy, list_instances

    # The pipe closes early in the owner's exit, before the process is gone: give it a moment.
    deadline = time.monotonic() + 5
    while alive(owner_pid, None) and time.monotonic() < deadline:
        time.sleep(0.02)
    gone = []
    for rec in list_instances(layout):
        if rec.owner_pid == owner_pid and not rec.owner_alive:
            destroy(rec)
            gone.append(rec.id)
    return gone


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="destroy a process's dhg instances when it dies")
    ap.add_argument("--home", required=True)
    ap.add_argument("--owner", type=int, required=True)
    args = ap.parse_args(argv)
    while True:
        try:
            if not os.read(0, 4096):
                break  # the owner is gone (its end of the pipe closed with it)
        except InterruptedError:
            continue
        except OSError:
            break
    reap_owner(Layout(Path(args.home)), args.owner)


if __name__ == "__main__":
    main()
