"""``dhvm prepare``: build the microVM image and the warm snapshot that every restore starts from.

The image phases (``image.py``: rootfs, wheels, venv, guest, kernel, image) are the same for every
VM backend; the snapshot step (``snapshot.py``) cold-boots that image through the chosen backend.
Each phase is skipped when the checksum of its inputs is unchanged (``runner.py``), so a second
run takes seconds. Every path comes from ``config.Layout``.
"""

from __future__ import annotations

import fcntl
import os
import sys
import time
from pathlib import Path

from ..config import DH_VERSION, Layout
from ..errors import PrepareError
from ..instances import reap_stale
from .image import GUEST_WHEELS, ImageBuild
from .runner import PhaseRunner, Progress
from .snapshot import firecracker_snapshot, qemu_snapshot

PHASES = ("rootfs", "wheels", "venv", "guest", "kernel", "image", "snapshot")
BACKENDS = ("qemu", "firecracker")


def _print_progress(msg: str) -> None:
    print(f"[dhvm prepare] {msg}", file=sys.stderr, flush=True)


def prepare(layout: Layout, backend: str = "qemu", dh_version: str = DH_VERSION, rebuild: bool = False,
            progress: Progress | None = None, log_path: str | os.PathLike | None = None,
            ram_mb: int | None = None, heap: str | None = None, accel: str = "auto",
            jvm_opts: str | None = None, firecracker: str | None = None, jailer: str | None = None,
            network: bool = False, fc_version: str | None = None, jailer_user: tuple[int, int] | None = None):
    """Build (or bring up to date) the image and snapshot for ``backend``; returns the snapshot.

    ``backend="firecracker"`` builds the same image, then obtains Firecracker (``firecracker``: a
    path; else PATH; else the pinned release ``fc_version``, downloaded and verified) and, where the
    host can run it, snapshots through its API (``network``: with a TAP device, off by default).

    Every phase reports its name and elapsed time through ``progress`` and logs to ``log_path``
    (default ``Layout.prepare_log``); a failure raises PrepareError naming the phase. ``jailer_user``:
    the (uid, gid) every jailed restore's Firecracker runs as (default: the caller's).
    ``ram_mb``/``heap`` size the guest and its JVM; ``jvm_opts`` are extra JVM flags (space-separated;
    None: ``-XX:TieredStopAtLevel=1`` under TCG, nothing under KVM).
    """
    if backend not in BACKENDS:
        raise PrepareError("setup", f"prepare builds images for the qemu and firecracker backends only (not "
                           f"{backend!r}); the local backend needs no image", Path(log_path or layout.prepare_log),
                           "run: dhvm prepare --backend qemu")
    layout.private_dir(layout.vm)
    log = Path(log_path) if log_path else layout.prepare_log
    log.parent.mkdir(parents=True, exist_ok=True)
    say = progress or _print_progress
    t0 = time.monotonic()

    def timed(msg: str) -> None:
        say(f"[{time.monotonic() - t0:6.1f}s] {msg}")

    reap_stale(layout)  # VMs (including cold boots) left behind by killed owners
    # One prepare at a time per DHG_HOME: a second one waits, then finds everything up to date.
    with open(layout.prepare_lock, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            timed(f"another prepare is running on {layout.vm}; waiting for it")
            fcntl.flock(lock, fcntl.LOCK_EX)
        runner = PhaseRunner(layout, rebuild, timed, log)
        runner.log(f"=== prepare dh={dh_version} backend={backend} rebuild={rebuild} ram={ram_mb}M heap={heap}")
        ImageBuild(runner, dh_version).run_all()
        if backend == "firecracker":
            snap = firecracker_snapshot(runner, dh_version, ram_mb, heap, jvm_opts, firecracker, jailer, network,
                                        fc_version, jailer_user)
        else:
            snap = qemu_snapshot(runner, dh_version, ram_mb, heap, accel, jvm_opts)
    timed(f"ready: {snap.dir} (log: {log})")
    return snap


__all__ = ["BACKENDS", "GUEST_WHEELS", "PHASES", "PrepareError", "prepare"]
