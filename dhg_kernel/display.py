"""Rendering a CellResult: in IPython (magic and kernel alike) and as text for the terminal."""

from __future__ import annotations

import datetime
import html
import sys
import threading
from typing import Callable

from . import protocol as P
from .live import LiveUpdate
from .result import CellResult, DisplayOutput, ExecutionError, TableResult


class _RemoteTraceback:
    """Shows the remote traceback in place of the local (uninteresting) one; IPython calls
    ``_render_traceback_`` when an exception has it."""

    error: ExecutionError

    def _render_traceback_(self) -> list[str]:
        lines = [line.rstrip("\n") for line in self.error.traceback]
        if not lines or not lines[-1].startswith(self.error.name) or self.error.value not in lines[-1]:
            # (also when the session reworded the error, e.g. "timed out", "instance replaced")
            lines.append(f"\x1b[0;31m{self.error.name}\x1b[0m: {self.error.value}".rstrip(": "))
        head = ["\x1b[0;36m--- in the Deephaven server ---\x1b[0m"]
        if self.error.summary:
            # The useful lines first; the whole Java and Python trace follows for whoever needs it.
            head += [f"\x1b[1;31m{self.error.summary[0]}\x1b[0m", *self.error.summary[1:],
                     "\x1b[0;36m--- full traceback ---\x1b[0m"]
        return [*head, *lines]


class RemoteCellError(_RemoteTraceback, Exception):
    """Raised in the notebook when a cell failed in the VM; IPython shows the remote traceback.

    Subclasses are made on the fly with the remote exception's name, so a notebook error reads
    ``ZeroDivisionError`` rather than ``RemoteCellError``.
    """

    def __init__(self, error: ExecutionError):
        super().__init__(f"{error.name}: {error.value}")
        self.error = error


class RemoteInterrupt(_RemoteTraceback, KeyboardInterrupt):
    """A cell cancelled by an interrupt or a timeout: a KeyboardInterrupt, with where the VM was."""

    def __init__(self, error: ExecutionError):
        super().__init__(error.value)
        self.error = error


def remote_error(error: ExecutionError) -> BaseException:
    """The exception to raise for a remote error; its class name is the remote exception's name."""
    base = RemoteInterrupt if error.name == "KeyboardInterrupt" else RemoteCellError
    name = error.name if error.name.isidentifier() else base.__name__
    cls = type(name, (base,), {"__module__": "dhvm"})
    return cls(error)


def _column_types(t: TableResult) -> list[str]:
    """``name type`` for each column, with Deephaven's type names (Instants are shown in UTC)."""
    out = []
    for c in t.columns:
        jtype = str(c.get("type", "?")).removeprefix("java.lang.").removeprefix("java.time.")
        out.append(f"{c.get('name')} {jtype}" + (" (UTC)" if jtype in ("Instant", "ZonedDateTime") else ""))
    return out


# A blink table keeps only the rows of its last update cycle: its size and rows are that cycle's.
BLINK_NOTE = "blink table: it keeps only the rows added in its last update cycle; earlier rows are gone"


def _size(t: TableResult, cols: int) -> str:
    """``N rows × M columns`` (a blink table's N is its last cycle's)."""
    return f"{t.rows:,} rows{' in its last update cycle' if t.blink else ''} × {cols} columns"


def table_heading(t: TableResult, max_rows_hint: str = "-n/--max-rows") -> tuple[str, str]:
    """(plain, html) heading for a table: its name, size, whether it ticks (and when it was
    snapshotted), a truncation note, and its column types."""
    cols = t.arrow.num_columns
    size = _size(t, cols)
    notes = []
    if t.refreshing:
        when = t.snapshot_time.strftime("%H:%M:%S UTC") if t.snapshot_time else "when the cell ended"
        notes.append(f"{'blink' if t.blink else 'ticking'} table: a snapshot taken at {when}")
    if t.blink:
        notes.append(BLINK_NOTE)
    if t.truncated:
        notes.append(f"showing the first {t.arrow.num_rows:,} of {t.rows:,} rows "
                     f"(raise with {max_rows_hint} or %config Dhvm.max_rows)")
    types = _column_types(t)
    badge = " · blink" if t.blink else " · ticking" if t.refreshing else ""
    plain = f"{t.name}  ({size}{badge})" + "".join(f"\n  {n}" for n in notes)
    if types:
        plain += "\n  columns: " + ", ".join(types)
    rich = (f"<h4 style='margin:0.6em 0 0.2em 0'><code>{html.escape(t.name)}</code> "
            f"<small style='font-weight:normal'>{size}</small>"
            + (" <small style='color:#0a7d32;font-weight:normal'>● ticking</small>" if t.refreshing else "")
            + "</h4>"
            + "".join(f"<p style='margin:0 0 0.2em 0;color:#a15c00'>{html.escape(n)}</p>" for n in notes)
            + (f"<p style='margin:0 0 0.4em 0;color:#666'><small>{html.escape(' · '.join(types))}</small></p>"
               if types else ""))
    return plain, rich


def timing_line(result: CellResult) -> str:
    """One line of per-phase timings (``-v``)."""
    parts = [f"{k.removesuffix('_ms')} {v:.1f} ms" for k, v in result.timings.items()]
    sent = f"; pushed {', '.join(result.files)}" if result.files else ""
    return f"[dhvm {result.backend}] " + ", ".join(parts) + sent


def show_table(t: TableResult) -> None:
    """One table in the notebook: its heading (name, size, notes), then the DataFrame."""
    from IPython.display import display

    import pandas as pd

    plain, rich = table_heading(t)
    display({"text/plain": plain, "text/html": rich}, raw=True)
    # The heading gives the size: no second "N rows × M columns" footer from pandas to contradict it.
    with pd.option_context("display.show_dimensions", False):
        display(t.df)


def _clock(when) -> str:
    return when.strftime("%H:%M:%S UTC") if when else "-"


# What a running view's heading says. It is also what a saved notebook keeps (JupyterLab saves the
# last update it showed): so it names the moment of the data, never just "live".
RUNNING = "snapshot at {when} (live while the kernel runs; re-run the cell to resume)"


def live_state(when, stopped: str | None = None, ticking: bool = True) -> str:
    """A live view's state in words: running, stopped (and why), or a static table's one snapshot."""
    if stopped:
        return f"○ stopped ({stopped}) · final snapshot at {_clock(when)}"
    if not ticking:
        return f"static table (it does not tick) · snapshot at {_clock(when)}"
    return RUNNING.format(when=_clock(when))


def live_bundle(t: TableResult, state: str, rows_note: str, df, stopped: bool = False) -> dict:
    """The MIME bundle of a live view: a heading (name, size, state, which rows) over the rows."""
    import pandas as pd

    cols = len(t.columns) or t.arrow.num_columns
    size = _size(t, cols)
    types = " · ".join(_column_types(t))
    color = "#777" if stopped else "#0a7d32"
    if t.blink:
        rows_note = f"{BLINK_NOTE} · {rows_note}"
    plain = f"{t.name}  ({size}) {state}\n  {rows_note}" + (f"\n  columns: {types}" if types else "")
    with pd.option_context("display.show_dimensions", False, "display.max_rows", max(len(df), 10)):
        body_text, body_html = df.to_string(), df.to_html(border=0)
    rich = (f"<div class='dhvm-live' data-table='{html.escape(t.name)}' data-rows='{t.rows}'>"
            f"<h4 style='margin:0.6em 0 0.2em 0'><code>{html.escape(t.name)}</code> "
            f"<small style='font-weight:normal'>{size}</small> "
            f"<small style='color:{color};font-weight:normal'>{html.escape(state)}</small></h4>"
            f"<p style='margin:0 0 0.2em 0;color:#666'><small>{html.escape(rows_note)}"
            + (f" · {html.escape(types)}" if types else "") + "</small></p>"
            f"{body_html}</div>")
    return {"text/plain": plain + "\n" + body_text, "text/html": rich}


# Why a live view ended, as the agent says it, in words.
LIVE_ENDINGS = {"released": "{name} was deleted", "rebound": "{name} now names something else",
                "cancelled": "stopped"}


class LiveView:
    """A live view's output in the notebook: one display id, updated with every snapshot, and left
    showing the last one (marked stopped, with why) when the view ends, which is what a saved
    notebook keeps."""

    def __init__(self, first: TableResult, rows: int, head: bool, rate: float):
        from IPython.display import display

        self.rows, self.head, self.rate = rows, head, rate
        self.watch = first.watch or first.name
        self.last: LiveUpdate | None = None
        self.skipped = 0  # snapshots that showed what was already shown (not sent again)
        self._lock = threading.Lock()
        df = first.df
        if first.truncated or head:
            df, which = df.head(rows), f"first {min(rows, len(df)):,} rows"
        else:
            df, which = df.tail(rows), f"last {min(rows, len(df)):,} rows"
        self._first = first
        self.handle = display(live_bundle(first, live_state(first.snapshot_time),
                                          f"{which} · starting the live view…", df), raw=True, display_id=True)

    def _bundle(self, u: LiveUpdate, stopped: str | None = None) -> dict:
        t = u.table
        assert t is not None
        which = f"{'first' if u.head else 'last'} {t.arrow.num_rows:,} rows"
        state = live_state(t.snapshot_time, stopped, u.ticking)
        rate = f" · at most {self.rate:g} updates/s" if u.ticking and not stopped else ""
        df = t.df
        if not u.head:
            # The last rows are labelled with their row numbers in the table (as the first view's
            # df.tail() is), not 0…n-1 of the snapshot.
            start = max(t.rows - len(df), 0)
            df = df.set_axis(range(start, start + len(df)))
        return live_bundle(t, state, which + rate, df, stopped=bool(stopped))

    def update(self, u: LiveUpdate) -> None:
        with self._lock:
            # (the first update is compared with what the cell showed)
            last = self.last.table if self.last is not None else self._first
            if last is not None and u.table is not None and last.rows == u.table.rows \
                    and last.arrow.equals(u.table.arrow):
                # The same rows again: no update, so no change a front end must save ("Save changes?").
                self.skipped += 1
                self.last = self.last or u  # (the view did start: its end says so)
                return
            self.last = u
            if self.handle is not None:
                self.handle.update(self._bundle(u), raw=True)

    def end(self, why: str) -> None:
        why = LIVE_ENDINGS.get(why, why).format(name=self._first.watch or self._first.name)
        with self._lock:
            if self.handle is None or (why == "static" and self.last is not None):
                return  # a table that does not tick: its one snapshot stays as it was shown
            if self.last is not None:
                self.handle.update(self._bundle(self.last, stopped=why), raw=True)
            else:
                t = self._first
                self.handle.update(live_bundle(t, live_state(t.snapshot_time, why), "the live view never started",
                                               t.df.head(self.rows), stopped=True), raw=True)


PLOTLY_MIME = "application/vnd.plotly.v1+json"
PLOTLY_DEFAULT_HEIGHT = 360  # what JupyterLab's Plotly renderer gives a layout without a height
# Each update redraws the whole plot (below): faster, a busy browser would never finish drawing one.
FIGURE_MAX_RATE = 1.0


class FigureView:
    """A live plotly-express figure in the notebook: a heading (its name and state) over the plot, each
    an output of its own display id, updated with every snapshot of the figure and left on the last one
    (marked stopped) when the view ends."""

    def __init__(self, shown: DisplayOutput, rate: float):
        from IPython.display import display

        self.watch = str(shown.transient[P.TRANSIENT_WATCH])
        self.rate = min(rate, FIGURE_MAX_RATE)
        self.last: LiveUpdate | None = None
        self.skipped = 0
        self._lock = threading.Lock()
        self._name = "figure" if self.watch.startswith("_") else self.watch
        self._shown = shown.data
        now = datetime.datetime.now(datetime.timezone.utc)  # (the cell's own plot was made just now)
        self.heading = display(self._heading(live_state(now), "starting the live view…"), raw=True, display_id=True)
        self.handle = display(shown.data, raw=True, metadata=shown.metadata or None, display_id=True)

    def _heading(self, state: str, note: str, stopped: bool = False) -> dict:
        color = "#777" if stopped else "#0a7d32"
        return {"text/plain": f"{self._name}  (plotly-express figure) {state}\n  {note}",
                "text/html": f"<div class='dhvm-figure' data-figure='{html.escape(self._name)}'>"
                             f"<h4 style='margin:0.6em 0 0.2em 0'><code>{html.escape(self._name)}</code> "
                             f"<small style='font-weight:normal'>plotly-express figure</small> "
                             f"<small style='color:{color};font-weight:normal'>{html.escape(state)}</small></h4>"
                             f"<p style='margin:0 0 0.2em 0;color:#666'><small>{html.escape(note)}</small></p></div>"}

    def update(self, u: LiveUpdate) -> None:
        with self._lock:
            if u.figure is None or (self.last is not None and u.figure == self.last.figure):
                self.skipped += 1  # the same plot again: nothing to send
                return
            self.last = u
            note = f"plotted from its tables' data · at most {self.rate:g} updates/s" if u.ticking else "static"
            self.heading.update(self._heading(live_state(u.taken, ticking=u.ticking), note), raw=True)
            # JupyterLab's Plotly renderer draws a plot once and ignores updates of it; an output whose
            # MIME type changed is rendered anew. So: a placeholder of the plot's height, then the plot.
            layout = (u.figure.get(PLOTLY_MIME) or {}).get("layout") or {}
            height = int(layout.get("height") or PLOTLY_DEFAULT_HEIGHT)
            self.handle.update({"text/plain": "(redrawing)", "text/html": f"<div style='height:{height}px'></div>"},
                               raw=True)
            self.handle.update(u.figure, raw=True)

    def end(self, why: str) -> None:
        why = LIVE_ENDINGS.get(why, why).format(name=self.watch)
        with self._lock:
            when = self.last.taken if self.last is not None else None
            self.heading.update(self._heading(live_state(when, why), "the plot below is its last snapshot"
                                              if self.last is not None else "the live view never started",
                                              stopped=True), raw=True)


def live_view(first: "TableResult | DisplayOutput", rows: int, head: bool, rate: float) -> "LiveView | FigureView":
    """The notebook output of a live view of a ticking table's result, or of a ticking figure's display."""
    if isinstance(first, DisplayOutput):
        return FigureView(first, rate)
    return LiveView(first, rows, head, rate)


def show_display(out: DisplayOutput, live: "Callable[[TableResult | DisplayOutput], bool] | None" = None) -> None:
    """Rich output from the VM, at the moment it arrives: ``display_data``, ``update_display_data``,
    ``clear_output``, or a displayed Deephaven table (rendered like a result table)."""
    from IPython.display import clear_output, publish_display_data

    for stream in (sys.stdout, sys.stderr):
        stream.flush()  # what the cell printed before this output comes first
    if out.kind == "table" and out.table is not None:
        if not (live and out.table.watch and live(out.table)):
            show_table(out.table)
    elif out.kind == "clear":
        clear_output(wait=out.wait)
    elif out.kind == "display" and out.transient.get(P.TRANSIENT_WATCH) and live and live(out):
        pass  # a ticking figure, shown as a live view
    else:
        transient = {k: v for k, v in out.transient.items() if k != P.TRANSIENT_WATCH}
        publish_display_data(out.data, out.metadata, transient=transient, update=out.kind == "update")


def show_in_ipython(result: CellResult, *, quiet: bool = False, verbose: bool = False,
                    live: Callable[[TableResult], bool] | None = None) -> None:
    """Display a cell's tables (stdout/stderr and rich output were already streamed) and raise its
    error, if any. ``live(t)``: show ticking table ``t`` as a live view (False: it cannot be one)."""
    if not quiet:
        for t in result.tables:
            if not (live and t.watch and live(t)):
                show_table(t)
    if verbose:
        print(timing_line(result), file=sys.stderr)
        for literal, why in result.files_skipped:
            print(f"[dhvm] not pushed: {literal!r} ({why})", file=sys.stderr)
    if result.error is not None:
        raise remote_error(result.error)


def format_text(result: CellResult, max_rows: int = 20, verbose: bool = False) -> str:
    """The result as terminal text (``dhvm exec``): tables as pandas prints them, then the error."""
    out: list[str] = []
    for d in result.displays:  # rich output as text (with --json, the whole MIME bundles)
        if d.kind == "table" and d.table is not None:
            out.append(f"== {table_heading(d.table, '--max-rows')[0]}\n{d.table.df.to_string(max_rows=max_rows)}")
        elif d.kind in ("display", "update"):
            out.append(d.data.get("text/plain") or f"<{', '.join(d.data)}>")
    for t in result.tables:
        plain, _ = table_heading(t, "--max-rows")
        out.append(f"== {plain}")
        out.append(t.df.to_string(max_rows=max_rows))
    if result.value is not None:
        out.append(result.value.get("text/plain", ""))
    if verbose:
        out.append(timing_line(result))
    if result.error is not None:
        out.append("".join(result.error.traceback).rstrip() or str(result.error))
    return "\n".join(out)


def format_mapping(data: dict, indent: str = "") -> str:
    """Nested status/stats dicts as indented ``key: value`` lines (``%dhvm status``, ``dhvm status``)."""
    lines: list[str] = []
    for k, v in data.items():
        if isinstance(v, dict):
            lines.append(f"{indent}{k}:")
            if v:
                lines.append(format_mapping(v, indent + "  "))
        elif isinstance(v, list):
            lines.append(f"{indent}{k}: {len(v)}")
            lines.extend(f"{indent}  - {item}" for item in v)
        else:
            lines.append(f"{indent}{k}: {v}")
    return "\n".join(lines)
