"""What one cell produced: a few small values that the magic, the kernel and the CLI all render from."""

from __future__ import annotations

import datetime

import json
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import pandas as pd
import pyarrow as pa

from .tables import to_pandas


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
    """Text the cell printed to stdout."""
    stderr: str = ""
    """Text the cell printed to stderr."""
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
