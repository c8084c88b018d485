"""What a session tells about itself: ``%dhvm status`` (its backend and server, starting nothing) and
a line of ``%dhvm sessions`` (running, since when, memory, what it started from)."""

from __future__ import annotations

import os
import time

from . import weblinks
from .config import CLUSTER_HOST_ENV
from .errors import DhvmError

# ``Session`` in annotations is session.py's: not imported, as session.py imports this module.


def summary(session: "Session") -> dict:
    """One line of ``%dhvm sessions``: running, since when, memory, what it started from."""
    srv = session.server
    if srv is not None and srv.dead and session._lock.acquire(timeout=1):
        try:
            if srv is session.server:  # found dead: reaped now, told as dead, replaced by the next cell
                session._bury(srv)
        finally:
            session._lock.release()
        srv = session.server
    out: dict = {"backend": session.backend_name, "mode": session.mode, "running": session.running,
                 "start_from": session.start_from or "base"}
    if srv is None and session.ended:
        out["ended"] = session.ended
    if srv is not None:
        out["age_s"] = round(time.time() - srv.started, 1)
        out["started_from"] = srv.checkpoint or "base"
        try:
            stats = session.stats() if srv.client.dead is None else {}
        except DhvmError:
            stats = {}
        out["heap_used_mb"] = _mb(stats.get("heap_used"))
        out["tables"] = stats.get("tables")
        out["vm_rss_mb"] = _mb(_process_rss(getattr(srv.instance, "proc", None)))
    return out


def status(session: "Session") -> dict:
    """What ``%dhvm status`` shows: backend, instance, server, without starting anything."""
    out = {"backend": session.backend_name, "mode": session.mode, "running": session.running,
           "dhg_home": str(session.layout.home)}
    cluster_host = os.environ.get(CLUSTER_HOST_ENV)
    if cluster_host:
        out["cluster_host"] = f"{cluster_host} (this kernel and its VMs run there)"
    if session._pool is not None:
        out["warm_pool"] = session._pool.describe()
    if session.passed_over:
        out["not_chosen"] = session.passed_over
    try:
        out.update(session.backend.describe())
    except DhvmError as e:  # status must not fail on a broken backend
        out["backend_error"] = str(e)
    srv = session.server
    if srv is not None:
        out["instance"] = srv.instance.describe()
        out["server"] = srv.info.get("server")
        out.update(weblinks.status_fields(session, cluster_host))
        out["deephaven_version"] = srv.info.get("deephaven_version")
        out["files_pushed"] = len(srv.pushed)
        out["started_from"] = f"checkpoint {srv.checkpoint}" if srv.checkpoint else "base snapshot"
    return out


def _mb(n) -> float | None:
    return round(n / 2**20, 1) if isinstance(n, (int, float)) else None


def _process_rss(proc) -> int | None:
    """Resident bytes of a VMM process (its guest's memory in use, on this host)."""
    try:
        for line in open(f"/proc/{proc.pid}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (AttributeError, OSError, ValueError):
        return None
    return None
