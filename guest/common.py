"""What every part of the guest agent shares: its log line, request timings, and sends that may fail."""

from __future__ import annotations

import sys
import time

from .. import protocol as P


def log(msg: str) -> None:
    """A line in the agent's log (the instance's agent.log, or the VM's console)."""
    print(f"[dhg-agent {time.strftime('%H:%M:%S')}] {msg}", file=sys.__stderr__, flush=True)


def ms(t0: float) -> float:
    """Milliseconds since ``t0`` (a ``time.perf_counter()`` reading), as replies report timings."""
    return round((time.perf_counter() - t0) * 1000, 3)


def safe_send(conn: P.FrameStream, header: dict, payloads=()) -> None:
    """Send a frame; if the host is gone there is nobody to tell, and the work goes on."""
    try:
        conn.send(header, payloads)
    except OSError:
        pass
