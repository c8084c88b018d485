"""Running one cell: its pushed files, its output as events while it runs, its results at the end.

A cell is compiled as a file of its own (``<dhvm-cell-N>``, kept in linecache so tracebacks show its
lines) and run in Deephaven's script scope; a last expression is evaluated apart, as in a notebook,
so its value can be shown. What goes back: stdout/stderr and display() output as they happen, then
the value, the figures, and every table the cell made or rebound; an error as a short summary ahead
of a traceback without the agent's own frames.
"""

from __future__ import annotations

import ast
import linecache
import os
import re
import sys
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Callable, ContextManager

from .. import protocol as P
from . import rich
from .common import Replies, ms, safe_send
from .inputs import bind_inputs
from .live import HIDDEN_PREFIX as LIVE_PREFIX

if TYPE_CHECKING:
    from .server import Deephaven


class FileRejected(Exception):
    """A pushed file's path would land outside the agent's working directory."""


def safe_target(workdir: Path, rel: str) -> Path:
    """Where a pushed file named ``rel`` goes under ``workdir``; refuses anything that escapes it."""
    if not rel or "\x00" in rel:
        raise FileRejected(f"empty or invalid file name {rel!r}")
    if rel.startswith(("/", "\\")) or os.path.isabs(rel):
        raise FileRejected(f"absolute path {rel!r} refused: only workspace-relative files are pushed")
    parts = Path(rel).parts
    if ".." in parts:
        raise FileRejected(f"path {rel!r} refused: '..' would leave the workspace")
    root = workdir.resolve()
    target = root.joinpath(*parts)
    # A symlink already inside the working directory must not lead the write elsewhere.
    real_parent = Path(os.path.realpath(target.parent))
    if real_parent != root and root not in real_parent.parents:
        raise FileRejected(f"path {rel!r} refused: it resolves outside the workspace ({real_parent})")
    if target.is_symlink():
        raise FileRejected(f"path {rel!r} refused: it is a symlink in the workspace")
    return target


def write_files(workdir: Path, files: list[dict], payloads: list[memoryview]) -> list[str]:
    """Write pushed files (all are checked before any is written). Returns their relative paths."""
    if len(files) != len(payloads):
        raise FileRejected(f"{len(files)} files declared but {len(payloads)} payloads sent")
    targets = [safe_target(workdir, f.get("path", "")) for f in files]
    for meta, target, data in zip(files, targets, payloads):
        if meta.get("size") is not None and meta["size"] != data.nbytes:
            raise FileRejected(f"{meta['path']}: declared {meta['size']} bytes, received {data.nbytes}")
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.dhg-tmp")
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, target)
    return [f["path"] for f in files]


class EventStream:
    """A text stream that turns every write into stdout/stderr events of the running cell (a long write
    into several, each within the protocol's header limit: nothing printed is lost or cut)."""

    encoding = "utf-8"
    errors = "replace"

    def __init__(self, send, rid: int, ev: str):
        self._send = send
        self._rid = rid
        self._ev = ev

    def write(self, text: str) -> int:
        try:
            for piece in P.text_chunks(str(text)):
                self._send({"ev": self._ev, "re": self._rid, "text": piece})
        except OSError:
            pass  # the host went away; the cell still finishes
        return len(text)

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False

    def readable(self) -> bool:
        return False

    def writable(self) -> bool:
        return True


class CellRunner:
    """Runs exec requests, one at a time on the main thread, in one namespace (Deephaven's script scope).

    ``running(conn, rid)`` is the agent's: while it is entered, a cancel of ``rid`` interrupts the
    main thread. Only the cell's own code runs inside it, never the agent's sending of results.
    """

    def __init__(self, workdir: Path, dh: "Deephaven", ns: dict,
                 running: Callable[[Replies, object], ContextManager]):
        self.workdir = workdir
        self.dh = dh
        self.ns = ns
        self.running = running
        self.count = 0  # cells run (their numbers name their code in tracebacks)

    def run(self, conn: Replies, header: dict, payloads: list) -> dict:
        """Run one exec request; returns the fields of its done reply (status, timings, result tables)."""
        rid = header.get("id")
        max_rows = (header.get("options") or {}).get("max_rows", 1000)
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        try:
            files = header.get("files") or []
            if files:  # the first payloads are the files', in order; inputs name theirs by index
                write_files(self.workdir, files, payloads[:len(files)])
            timings["write_files_ms"] = ms(t0)
            inputs = header.get("inputs") or []
            if inputs:
                t1 = time.perf_counter()
                bind_inputs(self.ns, inputs, payloads)
                timings["inputs_ms"] = ms(t1)
        except Exception as e:  # noqa: BLE001 - a bad file or input fails the cell before it runs
            safe_send(conn, P.error_event(type(e).__name__, str(e), re=rid))
            return {"status": "error", "timings": timings, "tables": []}

        self.count += 1
        code = header.get("code", "")
        cell = header.get("execution_count") or self.count  # the notebook's In[N]; a reused N keeps its code
        filename = f"<dhvm-cell-{cell}>"
        filename = filename if filename not in linecache.cache else f"<dhvm-cell-{cell}.{self.count}>"
        linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
        before = {n: id(v) for n, v in list(self.ns.items()) if self.dh.is_table(v)}
        before_figures = {n: id(v) for n, v in list(self.ns.items())
                          if rich.is_deephaven_figure(v) or rich.is_express_figure(v)}
        displayed: set[int] = set()  # tables display() showed: not shown again at the end

        def send_table(table, _kind: str) -> None:
            displayed.add(id(table))
            name = next((n for n, v in list(self.ns.items()) if v is table and not n.startswith("_")), "table")
            head, ipc = self.dh.table_payload(name, table, max_rows)
            safe_send(conn, {**head, **self._watchable(name, table), "re": rid, "display": True}, [ipc])

        rich.outlet.send_table = send_table
        rich.outlet.watch_name = lambda fig, name: self._watchable(name, fig, ticking=True).get("watch")
        rich.outlet.begin(lambda h, p: safe_send(conn, h, p), rid)
        t1 = time.perf_counter()
        status, last_value, last_name = self._execute(conn, rid, code, filename)
        timings["exec_ms"] = ms(t1)

        t2 = time.perf_counter()
        out_tables: list[str] = []
        try:
            changed = [(n, v) for n, v in list(self.ns.items())
                       if not n.startswith("_") and self.dh.is_table(v) and before.get(n) != id(v)
                       and id(v) not in displayed]
            if self.dh.is_table(last_value) and all(v is not last_value for _, v in changed):
                changed.append((last_name, last_value))
            else:
                self._send_value(conn, rid, last_value, last_name)
            # Figures the cell made (or rebound) and did not return or display, like tables: a Deephaven
            # Figure as a link, a plotly-express one as its plot (live, if it ticks and the host can).
            for n, v in list(self.ns.items()):
                if n.startswith("_") or before_figures.get(n) == id(v) or v is last_value:
                    continue
                if rich.is_deephaven_figure(v):
                    rich.publish(rich.deephaven_figure_bundle(v, name=n))
                elif rich.is_express_figure(v) and id(v) not in rich.outlet.shown:
                    rich.outlet.shown.add(id(v))
                    rich.publish(*_named_figure(v, n))
            for name, table in changed:
                head, ipc = self.dh.table_payload(name, table, max_rows)
                safe_send(conn, {**head, **self._watchable(name, table), "re": rid}, [ipc])
                out_tables.append(name)
        except BaseException as e:  # noqa: BLE001
            status = "error"
            safe_send(conn, P.error_event(type(e).__name__, f"while fetching result tables: {e}",
                                          _cell_traceback(e), re=rid))
        rich.outlet.end()
        timings["fetch_ms"] = ms(t2)
        timings["total_ms"] = ms(t0)
        return {"status": status, "timings": timings, "tables": out_tables}

    def _execute(self, conn: Replies, rid, code: str, filename: str) -> tuple[str, object, str | None]:
        """Run the code with its output captured. Returns the status (ok, error, cancelled), the last
        expression's value and its source text (the name a table it gives is shown under)."""
        status, last_value, last_name = "ok", None, None
        saved = sys.stdout, sys.stderr
        sys.stdout = EventStream(conn.send, rid, P.EV_STDOUT)
        sys.stderr = EventStream(conn.send, rid, P.EV_STDERR)
        try:
            with self.running(conn, rid):
                tree = ast.parse(code, filename)
                last_expr = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
                exec(compile(tree, filename, "exec"), self.ns)
                if last_expr is not None:
                    last_value = eval(compile(ast.Expression(last_expr.value), filename, "eval"), self.ns)
                    last_name = _expr_name(code, last_expr)
                rich.patch_pyplot()
                rich.flush_figures()  # figures the cell left open show at its end, as in a notebook
        except BaseException as e:  # noqa: BLE001 - KeyboardInterrupt (cancel) and SystemExit included
            status = "cancelled" if isinstance(e, KeyboardInterrupt) else "error"
            safe_send(conn, _cell_error_event(e, code, rid))
            _close_figures()
        finally:
            sys.stdout, sys.stderr = saved
        return status, last_value, last_name

    def _watchable(self, name: str, table, ticking: bool | None = None) -> dict:
        """For a ticking table (or figure, ``ticking``): ``{"watch": NAME}``, the scope name a live view
        of it can watch. One no public name holds (``time_table("PT1S")`` as the last expression) is
        kept under a hidden one, which the live view releases when it ends. A blink table says so."""
        blink = {"blink": True} if getattr(table, "is_blink", False) else {}
        if not (table.is_refreshing if ticking is None else ticking):
            return blink
        if name.isidentifier() and self.ns.get(name) is table:
            return {"watch": name, **blink}
        held = next((n for n, v in list(self.ns.items()) if v is table and not n.startswith("__")), None)
        if held is None:
            held = f"{LIVE_PREFIX}{self.count}_{sum(n.startswith(LIVE_PREFIX) for n in list(self.ns))}"
            self.ns[held] = table
        return {"watch": held, **blink}

    def _send_value(self, conn: Replies, rid, value, name: str | None) -> None:
        """The result event of a last expression's value that is not a table (tables go as tables)."""
        if rich.is_deephaven_figure(value):
            name = name if name and name.isidentifier() else None
            safe_send(conn, {"ev": P.EV_RESULT, "re": rid, "data": rich.deephaven_figure_bundle(value, name=name)})
        elif rich.is_ticking(value) and id(value) not in rich.outlet.shown:
            # A ticking figure goes out as a display the host can keep live (as a ticking table does).
            rich.outlet.shown.add(id(value))
            rich.publish(*_named_figure(value, name or ""))
        elif value is not None and not self.dh.is_table(value):
            data, blobs = rich.result_bundle(value)
            safe_send(conn, {"ev": P.EV_RESULT, "re": rid, "data": data}, blobs)


def _named_figure(fig, name: str) -> tuple[dict, dict, dict]:
    """(data, metadata, transient) of a plotly-express figure shown under scope name ``name``."""
    data, transient = rich.figure_bundle(fig, name)
    return data, {}, transient


def _expr_name(code: str, node: ast.expr) -> str:
    """The source text of an expression (its first line, at most 80 characters), for naming a table.

    (ast.get_source_segment re-splits the whole cell character by character, which is quadratic
    in the length of a line: minutes for a cell holding a 5 MB literal.)
    """
    start = 0
    for _ in range(node.lineno - 1):
        start = code.index("\n", start) + 1
    end = code.find("\n", start)
    line = code[start:] if end < 0 else code[start:end]
    # col_offset counts UTF-8 bytes; only the part of the line before it needs encoding.
    raw = line.encode()
    end_col = node.end_col_offset if node.end_lineno == node.lineno else len(raw)
    text = raw[node.col_offset:end_col].decode(errors="replace").strip()
    return text[:80] or "_"


def _close_figures() -> None:
    """A failed cell's half-drawn figures are dropped, not shown with the next cell."""
    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is not None:
        pyplot.close("all")


# -- errors -------------------------------------------------------------------------------------


# Where the whole text of a clipped error is (the error event must fit in one frame's header).
_WHOLE_ERROR = "the whole message: print(sys.last_value) in the next cell"


def _cell_error_event(exc: BaseException, code: str, rid) -> dict:
    """The error event of a failed cell: a short value and summary first, the whole traceback after.

    A huge message is clipped (its start and end kept around a note); the exception stays in the session
    as ``sys.last_value``, as Python's own REPL keeps it, so the whole of it can still be read."""
    sys.last_type, sys.last_value, sys.last_traceback = type(exc), exc, exc.__traceback__
    summary = P.clip_lines(_error_summary(exc, code), P.MAX_ERROR_CHARS // 4, _WHOLE_ERROR)
    value = str(exc)
    if summary:
        value = summary[0].split(": ", 1)[-1]  # the full text is in the traceback
    return P.error_event(type(exc).__name__, P.clip_text(value, P.MAX_ERROR_CHARS // 4, _WHOLE_ERROR),
                         P.clip_lines(_cell_traceback(exc), P.MAX_ERROR_CHARS // 2, _WHOLE_ERROR),
                         re=rid, summary=summary)


def _error_summary(exc: BaseException, code: str) -> list[str]:
    """A few lines to read before a long traceback: the message (Deephaven's own, when the error comes
    from Java), the query expression it is about, and the cell line that raised it. Empty for short errors."""
    text = str(exc)
    lines = text.splitlines()
    if len(lines) <= 3:
        return []
    message = re.sub(r"\.\s+:\s+", ": ", lines[0]).strip()
    inner = _java_field(text, "Exception message")
    if inner and inner not in message:
        message = f"{message}: {inner}"
    out = [f"{type(exc).__name__}: {message}"]
    expression = _java_field(text, "Full expression")
    if expression:
        out.append(f"  in the expression: {expression}")
    cell_frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename.startswith("<dhvm-cell-")]
    if cell_frames:
        frame = cell_frames[-1]
        source = code.splitlines()[frame.lineno - 1].strip() if frame.lineno and frame.lineno <= code.count("\n") + 1 else ""
        out.append(f"  at cell line {frame.lineno}: {source[:200]}")
    return out


def _java_field(text: str, label: str) -> str | None:
    """``Label : value`` from a Deephaven (Java) error text, e.g. "Exception message : Cannot find …"."""
    m = re.search(rf"^\s*{re.escape(label)}\s*:\s*(\S.*)$", text, re.M)
    return m.group(1).strip() if m else None


def _cell_traceback(exc: BaseException) -> list[str]:
    """The traceback lines of a cell error, without the agent's own frames."""
    tb = exc.__traceback__
    while tb is not None and not tb.tb_frame.f_code.co_filename.startswith("<dhvm-cell-"):
        tb = tb.tb_next
    if tb is None and isinstance(exc, SyntaxError):
        return traceback.format_exception_only(type(exc), exc)
    return traceback.format_exception(type(exc), exc, tb)
