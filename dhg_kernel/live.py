"""Live views on the host: one ``watch`` request per view, its ``live`` events handed to a callback
from a thread of its own, until the view is stopped or the table goes.

Why this way: the agent already has a connection to the host (the VM's agent stream), so a live view
needs no new socket, no login and no extra package, and it works wherever the notebook's output
goes (JupyterLab, VS Code, nbconvert): the front end turns each snapshot into
``update_display_data`` of one display id. The agent listens to the table with Deephaven's own
listener and sends at most ``rate`` snapshots a second (guest/live.py), so a burst of ticks is one
message.
"""

from __future__ import annotations

import datetime
import json
import threading
from dataclasses import dataclass
from typing import Callable

from . import protocol as P
from .client import AgentClient
from .config import CANCEL_GRACE_S
from .errors import DhvmError
from .result import TableResult, table_from_event

# What a view shows unless told otherwise: the last rows, at most 2 snapshots a second.
DEFAULT_LIVE_ROWS = 10
DEFAULT_LIVE_RATE = 2.0


def _utc(ns: int | None) -> datetime.datetime | None:
    return datetime.datetime.fromtimestamp(ns / 1e9, datetime.timezone.utc) if ns else None


@dataclass
class LiveUpdate:
    """One snapshot of a watched table (``table``) or plotly-express figure (``figure``)."""

    table: TableResult | None
    """The rows sent (``table.rows`` is the whole table's count; ``snapshot_time`` when it was taken)."""
    seq: int
    """0 for the first snapshot, then 1, 2…"""
    updated: datetime.datetime | None
    """When the table last ticked (None: not since the view began)."""
    ticking: bool
    head: bool
    """The first rows (True) or the last (False)."""
    figure: dict | None = None
    """A watched figure's MIME bundle (its Plotly JSON, and an HTML fallback) at ``taken``."""
    taken: datetime.datetime | None = None
    """When the server took this snapshot."""


class LiveFeed:
    """A live view's conversation with the agent: ``on_update`` for each snapshot, ``on_end(why)`` once
    at the end (``why``: cancelled, released, rebound, static, stopped: …, or the error)."""

    def __init__(self, client: AgentClient, request: dict, on_update: Callable[[LiveUpdate], None],
                 on_end: Callable[[str], None] | None = None, dtype_backend: str = "numpy_nullable"):
        self.client = client
        self.name = request["name"]
        self.on_update = on_update
        self.on_end = on_end
        self.header = request
        """The watch request (``Server.watch`` makes it): what is watched, how many rows, how often."""
        self.dtype_backend = dtype_backend
        self.rid = client.new_id()
        self.updates = 0
        self.last: LiveUpdate | None = None
        self.ended: str | None = None
        self._stop_reason: str | None = None
        self._thread = threading.Thread(target=self._run, name=f"dhvm-live-{self.name}", daemon=True)

    def start(self) -> "LiveFeed":
        self._thread.start()
        return self

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def _on_frame(self, frame: P.Frame) -> None:
        h = frame.header
        if h.get("ev") == P.EV_ERROR:
            raise DhvmError(f"{h.get('name')}: {h.get('value')}")
        if h.get("ev") != P.EV_LIVE:
            return
        if h.get("kind") == "figure":
            table, figure = None, json.loads(bytes(frame.payloads[0]))
        else:
            table = table_from_event({**h, "refreshing": h.get("ticking"), "snapshot_ns": h.get("taken_ns")},
                                     frame.payloads[0], self.dtype_backend)
            figure = None
        update = LiveUpdate(table, int(h.get("seq", 0)), _utc(h.get("updated_ns")), bool(h.get("ticking")),
                            bool(h.get("head")), figure, _utc(h.get("taken_ns")))
        self.last = update
        self.updates += 1
        self.on_update(update)

    def _run(self) -> None:
        why = "ended"
        try:
            done = self.client.request(self.header, (), self._on_frame, timeout=None, rid=self.rid)
            why = done.get("ended") or ("error" if done.get("status") != "ok" else "ended")
        except DhvmError as e:  # the agent died, refused the view, or a callback failed
            why = f"error: {e}"
        except Exception as e:  # noqa: BLE001 - a failing display must end this view, not the kernel
            why = f"error: {type(e).__name__}: {e}"
        if self._stop_reason is not None and why == "cancelled":
            why = self._stop_reason
        self.ended = why
        if self.on_end is not None:
            try:
                self.on_end(why)
            except Exception:  # noqa: BLE001 - nobody left to tell
                pass

    def stop(self, reason: str = "stopped", wait: float = CANCEL_GRACE_S) -> None:
        """Cancel the view and wait (up to ``wait`` seconds) for its thread to end."""
        self._stop_reason = reason
        if self._thread.is_alive():
            self.client.stop(self.rid)
            self.join(wait)

    def join(self, wait: float = CANCEL_GRACE_S) -> None:
        if threading.current_thread() is not self._thread:
            self._thread.join(wait)


class LiveViews:
    """A session's live views: they end when asked, and with the session's server."""

    def __init__(self):
        self._feeds: list[LiveFeed] = []
        self._lock = threading.Lock()

    def add(self, feed: LiveFeed) -> LiveFeed:
        with self._lock:
            self._feeds = [f for f in self._feeds if f.running] + [feed]
        return feed.start()

    def running(self) -> list[LiveFeed]:
        with self._lock:
            return [f for f in self._feeds if f.running]

    def stop(self, name: str | None = None, reason: str = "stopped") -> int:
        """End the views (of table ``name``, or all); returns how many were running."""
        with self._lock:
            chosen = [f for f in self._feeds if name is None or f.name == name]
            self._feeds = [f for f in self._feeds if f not in chosen and f.running]
        running = [f for f in chosen if f.running]
        for f in chosen:
            f.stop(reason, wait=0)  # all cancels go out first; then each gets its grace
        for f in chosen:
            f.join()
        return len(running)
