"""Live views: a watched table's row count, last update time and latest rows, sent as it ticks.

A ``watch`` request names a table in the script scope. Its answer is a stream of ``live`` events,
each carrying one consistent snapshot of the table's first or last rows as Arrow IPC, until the
host cancels it, its connection closes, the name is released or rebound, or (for a table that does
not tick) after the one snapshot there is. Deephaven's own listener says when the table changed; the
loop below sends at most ``rate`` snapshots a second, so a burst of updates costs one snapshot.

A plotly-express figure (``fig = dx.line(ticking, ...)``) is watched the same way: the loop listens to
the tables it draws from and sends the figure's MIME bundle (its plot of their data then, as JSON).
"""

from __future__ import annotations

import json
import threading
import time
from typing import TYPE_CHECKING

from .. import protocol as P
from . import rich

if TYPE_CHECKING:
    from .server import Deephaven

DEFAULT_ROWS = 10
DEFAULT_RATE = 2.0
MAX_RATE = 20.0
MAX_ROWS = 10_000
# Names cells.py keeps unnamed ticking results under (released when their view ends).
HIDDEN_PREFIX = "_dhvm_live_"
# How often a quiet watch looks at whether it was cancelled or its name rebound.
POLL_S = 0.25


def _bounded(value, default, low, high, what: str):
    if value is None:
        return default
    value = type(default)(value)
    if not low <= value <= high:
        raise ValueError(f"{what} must be between {low} and {high}, not {value}")
    return value


class Watch:
    """One live view: run() sends snapshots until stop is set or the table goes."""

    def __init__(self, dh: "Deephaven", ns: dict, header: dict, stop: threading.Event):
        self.dh = dh
        self.ns = ns
        self.name = header.get("name", "")
        self.table = ns.get(self.name)  # the watched object: a table or a plotly-express figure
        self.figure = rich.is_express_figure(self.table)
        if not (dh.is_table(self.table) or self.figure):
            raise KeyError(f"no Deephaven table named {self.name!r} in the session")
        self.rows = _bounded(header.get("rows"), DEFAULT_ROWS, 1, MAX_ROWS, "rows")
        self.rate = _bounded(header.get("rate"), DEFAULT_RATE, 0.01, MAX_RATE, "rate")
        self.head = bool(header.get("head"))
        self.stop = stop
        self.changed = threading.Event()
        self.updated_ns: int | None = None
        self.updates = 0  # ticks the listener saw (a snapshot may cover several)

    def _on_update(self, update, is_replay: bool) -> None:
        # Runs on Deephaven's update thread: only note it; the snapshot is taken on the watch's thread.
        self.updated_ns = time.time_ns()
        self.updates += 1
        self.changed.set()

    def _ended(self) -> str | None:
        """Why the watch must end now (None: it goes on)."""
        if self.stop.is_set():
            return "cancelled"
        current = self.ns.get(self.name)
        if current is None:
            return "released"
        if current is not self.table:
            return "rebound"
        return None

    def _sources(self) -> list:
        """The tables whose ticks change the view."""
        return [t for t in rich.express_tables(self.table) if t.is_refreshing] if self.figure else [self.table]

    def _figure_event(self, sent: int, sources: list) -> tuple[dict, list]:
        """One snapshot of a figure: its MIME bundle as a JSON payload (plotly's own encoder made it)."""
        from deephaven import update_graph

        if sources:
            with update_graph.shared_lock(sources[0]):  # its tables' data of one moment (one update graph)
                plot = self.table.get_hydrated_figure()
        else:
            plot = self.table.get_hydrated_figure()
        data = rich.plotly_bundle(plot)  # (the JSON and HTML are made outside the lock)
        return ({"ev": P.EV_LIVE, "kind": "figure", "name": self.name, "seq": sent, "ticking": bool(sources),
                 "taken_ns": time.time_ns(), "updated_ns": self.updated_ns, "updates": self.updates},
                [json.dumps(data).encode()])

    def _table_event(self, sent: int, ticking: bool, view) -> tuple[dict, list]:
        """One snapshot of a table's first or last rows, as Arrow IPC."""
        from deephaven import update_graph

        table = self.table
        if ticking:
            with update_graph.shared_lock(table):  # the count and the rows of one moment
                rows = int(table.size)
                snap = view.snapshot()
        else:
            rows, snap = int(table.size), view
        return ({"ev": P.EV_LIVE, "name": self.name, "rows": rows, "seq": sent, "ticking": ticking,
                 "taken_ns": time.time_ns(), "updated_ns": self.updated_ns, "updates": self.updates,
                 "head": self.head, "sent_rows": int(snap.size), "blink": bool(getattr(table, "is_blink", False)),
                 **self.dh.describe_columns(table)},
                [self.dh.arrow_ipc(snap)])

    def run(self, send) -> dict:
        """Send ``live`` events with ``send(header, payloads)``; returns the done reply's fields."""
        table = self.table
        sources = self._sources()
        ticking = any(bool(t.is_refreshing) for t in sources)
        sources = [t for t in sources if t.is_refreshing]
        view = None if self.figure else table.head(self.rows) if self.head else table.tail(self.rows)
        handles = []
        if ticking:
            from deephaven.table_listener import listen

            handles = [listen(t, self._on_update, description=f"dhg live view of {self.name}") for t in sources]
        sent, why = 0, None
        next_at = 0.0
        self.changed.set()  # the first snapshot goes at once
        try:
            while True:
                why = self._ended()
                if why:
                    break
                if not self.changed.wait(POLL_S):
                    continue
                wait = next_at - time.monotonic()
                if wait > 0:  # the rate limit: updates meanwhile are coalesced into the next snapshot
                    self.stop.wait(wait)
                    continue
                self.changed.clear()
                send(*(self._figure_event(sent, sources) if self.figure else self._table_event(sent, ticking, view)))
                sent += 1
                next_at = time.monotonic() + 1.0 / self.rate
                if not ticking:
                    why = "static"
                    break
        finally:
            for handle in handles:
                handle.stop()
            if self.name.startswith(HIDDEN_PREFIX) and self.ns.get(self.name) is table:
                del self.ns[self.name]  # an unnamed result, kept only for this view
        return {"snapshots": sent, "updates": self.updates, "ended": why}
