"""What one cell produced: a few small values that the magic, the kernel and the CLI all render from,
and ``CellEvents``, the one place where the agent's events become those values."""

from __future__ import annotations

import collections
import datetime
import json
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable

import pandas as pd
import pyarrow as pa

from . import protocol as P
from .tables import read_ipc, to_pandas


@dataclass
class TableResult:
    """A Deephaven table the cell created or rebound (or its last expression)."""

    name: str
    """Variable name in the session (or the source of the last expression)."""
    rows: int
    """Rows in the whole table in the VM."""
    arrow: pa.Table
    """The rows that travelled (at most ``max_rows``)."""
    columns: list[dict[str, str]] = field(default_factory=list)
    """Column names and Deephaven types."""
    truncated: bool = False
    """True when only the first ``max_rows`` rows were sent."""
    refreshing: bool = False
    """True for a ticking table (a snapshot was sent)."""
    dtype_backend: str = "numpy_nullable"
    """How ``df`` maps Arrow types to pandas dtypes."""
    snapshot_time: "datetime.datetime | None" = None
    """For a ticking table: when the server took the snapshot that was sent (UTC)."""
    watch: str | None = None
    """For a ticking table: the name a live view of it watches in the session (see live.py)."""
    blink: bool = False
    """A blink table: it holds only the rows of its last update cycle."""

    @cached_property
    def df(self) -> pd.DataFrame:
        """The table as a pandas DataFrame."""
        return to_pandas(self.arrow, self.dtype_backend, rows=None if self.truncated else self.rows)

    def summary(self) -> str:
        shown = f"first {self.arrow.num_rows:,} of {self.rows:,} rows" if self.truncated else f"{self.rows:,} rows"
        return f"{self.name}: {shown} x {self.arrow.num_columns} columns" + (" (ticking; snapshot)" if self.refreshing else "")


@dataclass
class ExecutionError:
    """An error raised by the cell in the VM (or by the machinery around it)."""

    name: str
    """Exception class name (``NameError``, ``DHError``, ``AgentDied``…)."""
    value: str
    """Exception message."""
    traceback: list[str] = field(default_factory=list)
    """Formatted remote traceback lines."""
    summary: list[str] = field(default_factory=list)
    """For long errors (Deephaven's Java traces): a few lines to read first (message, expression, cell line)."""

    def __str__(self) -> str:
        return f"{self.name}: {self.value}"


@dataclass
class DisplayOutput:
    """One piece of rich output a cell sent while it ran, in order with its stdout."""

    kind: str
    """``display`` (display_data), ``update`` (update_display_data), ``clear`` (clear_output) or
    ``table`` (``display(t)`` of a Deephaven table)."""
    data: dict[str, Any] = field(default_factory=dict)
    """MIME bundle (binary values base64-encoded, as Jupyter carries them)."""
    metadata: dict[str, Any] = field(default_factory=dict)
    transient: dict[str, Any] = field(default_factory=dict)
    """``display_id`` for outputs that can be updated."""
    wait: bool = False
    """For ``clear``: clear when the next output arrives."""
    table: TableResult | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind}
        if self.kind == "table" and self.table is not None:
            out["table"] = self.table.name
            out["data"] = {"text/plain": self.table.df.to_string(max_rows=20)}
        elif self.kind == "clear":
            out["wait"] = self.wait
        else:
            out.update(data=self.data, metadata=self.metadata, transient=self.transient)
        return out


@dataclass
class CellResult:
    """Everything one cell produced."""

    stdout: str = ""
    """Text the cell printed to stdout. When it was also streamed (to a notebook or a terminal), only its
    last ``KEPT_OUTPUT_CHARS`` characters, after a note of how many were not kept (``stdout_dropped``)."""
    stderr: str = ""
    """Text the cell printed to stderr (kept as ``stdout`` is)."""
    stdout_dropped: int = 0
    """Characters of stdout that were streamed but not kept in ``stdout``."""
    stderr_dropped: int = 0
    """Characters of stderr that were streamed but not kept in ``stderr``."""
    tables: list[TableResult] = field(default_factory=list)
    """Tables created or rebound by the cell, in scope order."""
    error: ExecutionError | None = None
    """The cell's error, if it failed."""
    timings: dict[str, float] = field(default_factory=dict)
    """Milliseconds per phase (``scan_ms``, ``write_files_ms``, ``exec_ms``, ``fetch_ms``, ``roundtrip_ms``…)."""
    files: list[str] = field(default_factory=list)
    """Workspace files sent with this cell."""
    files_skipped: list[tuple[str, str]] = field(default_factory=list)
    """String literals that looked like files but were not sent, with the reason."""
    full_tables: dict[str, TableResult] = field(default_factory=dict)
    """Tables fetched whole on request (``-o NAME``), by name."""
    value: dict[str, str] | None = None
    """MIME bundle of the cell's last expression when it is not a table (``text/plain``, maybe ``text/html``)."""
    displays: list[DisplayOutput] = field(default_factory=list)
    """Rich output (``display()``, figures, ``clear_output``) in the order the cell made it."""
    status: str = "ok"
    """``ok``, ``error`` or ``cancelled``."""
    backend: str = ""
    """Backend (and instance) the cell ran on."""

    @property
    def ok(self) -> bool:
        return self.error is None and self.status == "ok"

    def table(self, name: str) -> TableResult:
        for t in self.tables:
            if t.name == name:
                return t
        raise KeyError(f"the cell returned no table named {name!r} (it returned: "
                       f"{', '.join(t.name for t in self.tables) or 'none'})")

    def to_dict(self, max_json_rows: int | None = None) -> dict[str, Any]:
        """A JSON-ready dict (tables as column lists + records, timestamps as ISO strings)."""
        tables = []
        for t in self.tables:
            df = t.df if max_json_rows is None else t.df.head(max_json_rows)
            tables.append({
                "name": t.name, "rows": t.rows, "sent_rows": t.arrow.num_rows, "truncated": t.truncated,
                "refreshing": t.refreshing, "columns": t.columns,
                "dtypes": {c: str(d) for c, d in t.df.dtypes.items()},
                "data": json.loads(df.to_json(orient="records", date_format="iso", date_unit="ns")),
            })
        return {
            "status": self.status, "ok": self.ok, "stdout": self.stdout, "stderr": self.stderr,
            "stdout_dropped": self.stdout_dropped, "stderr_dropped": self.stderr_dropped,
            "error": None if self.error is None else {
                "name": self.error.name, "value": self.error.value, "summary": self.error.summary,
                "traceback": self.error.traceback},
            "tables": tables, "value": self.value, "displays": [d.to_dict() for d in self.displays],
            "timings": self.timings, "files": self.files,
            "files_skipped": [list(s) for s in self.files_skipped], "backend": self.backend,
        }


class RemoteValue:
    """The last expression's value from the VM, displayed as the cell's Out[] with its own MIME bundle."""

    def __init__(self, data: dict[str, str]):
        self.data = data

    def _repr_mimebundle_(self, include=None, exclude=None):
        return dict(self.data)

    def __repr__(self) -> str:
        return self.data.get("text/plain", "")


def table_from_event(header: dict, payload, dtype_backend: str) -> TableResult:
    """A ``table`` event and its Arrow payload as a TableResult."""
    snap_ns = header.get("snapshot_ns")
    return TableResult(name=header["name"], rows=header.get("rows", 0), arrow=read_ipc(payload),
                       columns=header.get("columns", []), truncated=bool(header.get("truncated")),
                       refreshing=bool(header.get("refreshing")), dtype_backend=dtype_backend,
                       snapshot_time=datetime.datetime.fromtimestamp(snap_ns / 1e9, datetime.timezone.utc)
                       if snap_ns else None, watch=header.get("watch"), blink=bool(header.get("blink")))


Stream = Callable[[str], None]

# Output a cell streams (to a notebook, a terminal) is kept in its CellResult only up to this many of its
# last characters: a cell printing gigabytes must not hold them all in the kernel as well.
KEPT_OUTPUT_CHARS = 1 << 20


class OutputTail:
    """The last ``limit`` characters of a stream of text, and how many came before them."""

    def __init__(self, limit: int | None = KEPT_OUTPUT_CHARS):
        self.limit = limit
        """None: keep everything."""
        self.dropped = 0
        self._parts: collections.deque[str] = collections.deque()
        self._size = 0

    def add(self, text: str) -> None:
        self._parts.append(text)
        self._size += len(text)
        if self.limit is None:
            return
        while self._size > self.limit:
            excess, first = self._size - self.limit, self._parts[0]
            if len(first) <= excess:
                self._parts.popleft()
                cut = len(first)
            else:
                self._parts[0] = first[excess:]
                cut = excess
            self._size -= cut
            self.dropped += cut

    def text(self, what: str) -> str:
        """The text kept, after a note of what was not (``what``: the stream's name)."""
        kept = "".join(self._parts)
        if not self.dropped:
            return kept
        return (f"[dhvm: the first {self.dropped:,} characters of {what} were shown as they came and not kept; "
                f"the last {len(kept):,} follow]\n{kept}")


class CellEvents:
    """Builds the CellResult of one ``exec`` request from its events, and streams them as they come.

    Pass it as the request's ``on_frame``; ``finish`` then takes the ``done`` header. Output and
    display events reach the callbacks at once (the cell is still running); ``bundle`` rewrites MIME
    bundles on their way (the session turns a named Deephaven widget into a link to its web UI).
    """

    def __init__(self, result: CellResult, dtype_backend: str = "numpy_nullable", on_stdout: Stream | None = None,
                 on_stderr: Stream | None = None, on_display: Callable[[DisplayOutput], None] | None = None,
                 bundle: Callable[[dict], dict] = lambda data: data):
        self.result = result
        self.dtype_backend = dtype_backend
        self.on_stdout, self.on_stderr, self.on_display = on_stdout, on_stderr, on_display
        self.bundle = bundle
        # Output that is streamed is kept only as a tail; output nobody sees as it comes is kept whole.
        self._out = OutputTail(KEPT_OUTPUT_CHARS if on_stdout else None)
        self._err = OutputTail(KEPT_OUTPUT_CHARS if on_stderr else None)

    def __call__(self, frame: P.Frame) -> None:
        h = frame.header
        kind = h.get("ev")
        result = self.result
        if kind == P.EV_STDOUT:
            self._out.add(h["text"])
            if self.on_stdout:
                self.on_stdout(h["text"])
        elif kind == P.EV_STDERR:
            self._err.add(h["text"])
            if self.on_stderr:
                self.on_stderr(h["text"])
        elif kind == P.EV_TABLE and h.get("display"):
            self._show(DisplayOutput("table", table=table_from_event(h, frame.payloads[0], self.dtype_backend)))
        elif kind == P.EV_TABLE:
            result.tables.append(table_from_event(h, frame.payloads[0], self.dtype_backend))
        elif kind == P.EV_CLEAR:
            self._show(DisplayOutput("clear", wait=bool(h.get("wait"))))
        elif kind == P.EV_DISPLAY:
            self._show(DisplayOutput("update" if h.get("update") else "display",
                                     self.bundle(P.inline_payloads(h.get("data") or {}, frame.payloads)),
                                     h.get("metadata") or {}, h.get("transient") or {}))
        elif kind == P.EV_RESULT:
            result.value = self.bundle(P.inline_payloads(h.get("data") or {}, frame.payloads))
        elif kind == P.EV_ERROR:
            result.error = ExecutionError(h.get("name", "Error"), h.get("value", ""), h.get("traceback") or [],
                                          h.get("summary") or [])

    def _show(self, shown: DisplayOutput) -> None:
        self.result.displays.append(shown)
        if self.on_display:
            self.on_display(shown)

    def finish(self, done: dict) -> CellResult:
        """The result, completed with the ``done`` header (status and the agent's timings)."""
        self.result.stdout, self.result.stderr = self._out.text("stdout"), self._err.text("stderr")
        self.result.stdout_dropped, self.result.stderr_dropped = self._out.dropped, self._err.dropped
        if done:
            self.result.status = done.get("status", "error")
        return self.result
