"""The guest agent: a Deephaven server plus a cell executor, served over the dhg wire protocol.

It runs inside the VM (or as a plain subprocess for the local backend). It starts the embedded
Deephaven server in this very process, so cells run in Deephaven's own script scope (tables a cell
makes are visible in the web IDE too), ``print`` output is captured per cell and streamed while the
cell runs, and tables travel back as Arrow IPC without a round trip through gRPC.

Threads: the main thread executes requests one at a time (so a cancel can interrupt it with
SIGINT, which also wakes blocking calls like ``time.sleep``); one reader thread per connection
decodes frames and answers the cheap requests (hello, stats, cancel) at once.
"""

from __future__ import annotations

import argparse
import ast
import builtins
import fcntl
import hashlib
import linecache
import os
import queue
import re
import resource
import signal
import socket
import struct
import sys
import tempfile
import threading
import time
import traceback
import types
from pathlib import Path

try:
    from dhg_kernel import protocol as P
    from dhg_kernel.guest import rich
except ImportError:  # inside the VM image protocol.py and rich.py sit beside this file
    import protocol as P  # type: ignore[no-redef]
    import rich  # type: ignore[no-redef]

AGENT_VERSION = "0.2.0"
_ARROW_EOS = b"\xff\xff\xff\xff\x00\x00\x00\x00"
# Must match dhg_kernel.guest_java (a test checks): the agent runs where dhg_kernel may be absent.
AUTH_HANDLER = "dhg.TokenAuthHandler"
PSK_TYPE = "io.deephaven.authentication.psk.PskAuthenticationHandler"
JVM_OPENS = ("java.base/java.lang", "java.base/java.util", "java.base/java.util.concurrent")
# A VM's clock is stepped to the host's when it is further off than this (see Clock).
CLOCK_TOLERANCE_NS = 10_000_000
# Threads answering completions and inspections (more only while earlier ones are stuck).
MAX_QUESTION_THREADS = 4


def _log(msg: str) -> None:
    print(f"[dhg-agent {time.strftime('%H:%M:%S')}] {msg}", file=sys.__stderr__, flush=True)


# ---------------------------------------------------------------------------------------------
# Pushed files


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


# ---------------------------------------------------------------------------------------------
# Output capture


class EventStream:
    """A text stream that turns every write into a stdout/stderr event of the running cell."""

    encoding = "utf-8"
    errors = "replace"

    def __init__(self, send, re: int, ev: str):
        self._send = send
        self._re = re
        self._ev = ev

    def write(self, text: str) -> int:
        if text:
            try:
                self._send({"ev": self._ev, "re": self._re, "text": str(text)})
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


# ---------------------------------------------------------------------------------------------
# Deephaven


class Deephaven:
    """The embedded Deephaven server and conversions of its tables."""

    def __init__(self, host: str, port: int, heap: str, classes: Path):
        self.host = host
        self.port = port or _free_port(host)
        self.heap = heap
        self.classes = classes
        self.version = "?"
        self.started_ms = 0.0

    def start(self) -> None:
        t0 = time.perf_counter()
        from deephaven_server import Server

        if not (self.classes / "dhg" / "TokenAuthHandler.class").is_file():
            # Fail closed: without our handler the server would have to run without a login.
            raise SystemExit(f"dhg agent: {self.classes}/dhg/TokenAuthHandler.class is missing; refusing to "
                             "start a Deephaven server without authentication")
        # Logins need the instance's own key, which the host sets after start (local) or after each
        # restore (VMs): until then every login is refused, and the snapshot holds no key.
        auth = [f"-DAuthHandlers={AUTH_HANDLER}"]
        # -Xrs: the JVM leaves SIGINT to Python, which is how a cancel interrupts a cell.
        # Java's temp files (Jetty's work dir, extracted native libraries) go where Python's go: the
        # instance's own directory for a local agent, so they vanish with it; no hsperfdata files.
        jvm = [f"-Xmx{self.heap}", "-Xrs", f"-Djava.io.tmpdir={tempfile.gettempdir()}", "-XX:-UsePerfData",
               *(f"--add-opens={m}=ALL-UNNAMED" for m in JVM_OPENS)]
        self.server = Server(host=self.host, port=self.port, jvm_args=[*jvm, *auth],
                             extra_classpath=[str(self.classes)])
        self.server.start()
        import jpy

        # Deephaven's web UI offers the login its server names: name the PSK type our handler answers to,
        # so /ide/?psk=KEY logs in.
        jpy.get_type("io.deephaven.configuration.Configuration").getInstance().setProperty("AuthHandlers", PSK_TYPE)
        self._auth = jpy.get_type(AUTH_HANDLER)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            from importlib.metadata import version

            self.version = version("deephaven-server")
        except Exception:
            pass
        self.started_ms = (time.perf_counter() - t0) * 1000

    def set_key(self, key: str | None) -> None:
        """The key logins must present from now on (None: refuse all)."""
        self._auth.setKey(key or None)

    @property
    def has_key(self) -> bool:
        return bool(self._auth.hasKey())

    def warm_up(self) -> None:
        """Run a small query so the common code paths are loaded before the first cell (and snapshot)."""
        from deephaven import empty_table

        t = empty_table(100).update(["X = i", "Y = X * 1.5", "S = `s` + X", "T = now()"]).where("X > 3")
        self.arrow_ipc(t)

    @staticmethod
    def is_table(obj) -> bool:
        from deephaven.table import Table

        return isinstance(obj, Table)

    @staticmethod
    def arrow_ipc(table) -> bytes:
        """The table as one Arrow IPC stream (schema + record batches + end marker)."""
        try:
            from deephaven.arrow import _JTableToArrowConverter

            conv = _JTableToArrowConverter(table.j_table)
            parts = [memoryview(conv.getSchema()).cast("B")]
            while conv.hasNext():
                parts.append(memoryview(conv.next()).cast("B"))
            parts.append(_ARROW_EOS)
            return b"".join(parts)
        except ImportError:  # another Deephaven version: go through pyarrow
            import pyarrow as pa
            from deephaven.arrow import to_arrow

            at = to_arrow(table)
            sink = pa.BufferOutputStream()
            with pa.ipc.new_stream(sink, at.schema) as writer:
                writer.write_table(at)
            return sink.getvalue().to_pybytes()

    def describe(self, table) -> dict:
        return {
            "rows": int(table.size),
            "columns": [{"name": c.name, "type": str(c.data_type)} for c in table.columns],
            "refreshing": bool(table.is_refreshing),
        }

    def table_payload(self, name: str, table, max_rows: int | None) -> tuple[dict, bytes]:
        """A table event header and its Arrow payload, cut to ``max_rows``."""
        snapshot_ns = None
        if table.is_refreshing:
            table = table.snapshot()  # one consistent view of a ticking table
            snapshot_ns = time.time_ns()
        total = int(table.size)
        sent = table if max_rows is None or total <= max_rows else table.head(max_rows)
        ipc = self.arrow_ipc(sent)
        # (described as the table is: the snapshot itself does not tick)
        header = {"ev": P.EV_TABLE, "name": name, **self.describe(table), "refreshing": snapshot_ns is not None,
                  "rows": total,
                  "sent_rows": min(total, max_rows) if max_rows is not None else total,
                  "truncated": max_rows is not None and total > max_rows,
                  **({"snapshot_ns": snapshot_ns} if snapshot_ns else {})}
        return header, ipc

    def jvm_memory(self) -> dict:
        import jpy

        rt = jpy.get_type("java.lang.Runtime").getRuntime()
        return {"heap_used": rt.totalMemory() - rt.freeMemory(), "heap_max": rt.maxMemory()}


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------
# The agent


class Agent:
    """Executes requests from connected hosts against one Deephaven script scope."""

    def __init__(self, workdir: Path, dh: Deephaven, namespace: dict, clock: "Clock | None" = None):
        self.workdir = workdir
        self.dh = dh
        self.ns = namespace
        self.clock = clock or Clock(enabled=False)
        self.jobs: queue.Queue = queue.Queue()
        # Completion and inspection run on threads of their own: a slow answer never holds up a cell,
        # a cell never holds up an answer, and one stuck answer (a property that blocks) does not hold
        # up the next question: another thread takes it (up to MAX_QUESTION_THREADS).
        self.questions: queue.Queue = queue.Queue()
        self._question_lock = threading.Lock()
        self._question_threads = 0
        self._idle_question_threads = 0
        self.main_thread = threading.main_thread().ident
        self.running: tuple[object, int] | None = None  # (connection, request id) of the running exec
        self.running_lock = threading.Lock()
        self.cells = 0
        self.started = time.time()

    # -- connections -------------------------------------------------------------------------

    def serve(self, listener: socket.socket | None) -> None:
        """Run requests on the main thread forever; connections are accepted on ``listener``."""
        if listener is not None:
            threading.Thread(target=self._accept_loop, args=(listener,), name="dhg-accept", daemon=True).start()
        while True:
            try:
                conn, header, payloads = self.jobs.get()
                self._handle_job(conn, header, payloads)
            except KeyboardInterrupt:
                pass  # a cancel that arrived just after its cell ended

    def serve_serial(self, device: str) -> None:
        """Serve one host at a time over a virtio-serial port (the QEMU backend)."""
        threading.Thread(target=self._serial_loop, args=(device,), name="dhg-serial", daemon=True).start()
        self.serve(None)

    def _serial_loop(self, device: str) -> None:
        while True:
            # A read of 0 bytes means the host side is not connected: reopen and wait for the next host.
            conn = P.FrameStream(P.FdChannel(os.open(device, os.O_RDWR)))
            self._read_loop(conn)
            time.sleep(0.02)

    def _accept_loop(self, listener: socket.socket) -> None:
        while True:
            sock, _ = listener.accept()
            conn = P.FrameStream(sock)
            threading.Thread(target=self._read_loop, args=(conn,), name="dhg-conn", daemon=True).start()

    def _read_loop(self, conn: P.FrameStream) -> None:
        while True:
            try:
                frame = conn.recv()
            except P.ConnectionClosed:
                break
            except P.ProtocolError as e:
                _safe_send(conn, P.error_event("ProtocolError", str(e)))
                if e.recoverable:
                    continue
                break
            except OSError:
                break
            self._dispatch(conn, frame.header, frame.payloads)
        self._cancel_if_running(conn, None)
        conn.close()

    def _dispatch(self, conn: P.FrameStream, header: dict, payloads: list) -> None:
        op, re = header.get("op"), header.get("id")
        if header.get("now_ns") is not None:
            self.clock.observe(header["now_ns"])
        if op == P.OP_CLOCK:
            return  # a notice: no reply
        if op == P.OP_HELLO:
            version = header.get("version")
            if version != P.PROTOCOL_VERSION:
                _safe_send(conn, P.error_event(
                    "VersionMismatch", f"host speaks protocol {version}, agent speaks {P.PROTOCOL_VERSION}",
                    re=re))
            _safe_send(conn, {"ev": P.EV_DONE, "re": re, "status": "ok", **self.hello_info()})
        elif op == P.OP_CANCEL:
            cancelled = self._cancel_if_running(conn, header.get("target"))
            _safe_send(conn, {"ev": P.EV_DONE, "re": re, "status": "ok", "cancelled": cancelled})
        elif op == P.OP_RESTORED:
            info = after_restore(header, payloads, self.dh, self.clock)
            # A clone's life starts now (read after the clock was set): the snapshot's warm-up cells
            # and uptime are not its own.
            self.cells, self.started = 0, time.time()
            _safe_send(conn, {"ev": P.EV_DONE, "re": re, "status": "ok", **info})
        elif op == P.OP_STATS:
            _safe_send(conn, {"ev": P.EV_DONE, "re": re, "status": "ok", **self.stats()})
        elif op in (P.OP_COMPLETE, P.OP_INSPECT):
            with self._question_lock:
                if self._idle_question_threads == 0 and self._question_threads < MAX_QUESTION_THREADS:
                    self._question_threads += 1
                    threading.Thread(target=self._answer_loop, name="dhg-introspect", daemon=True).start()
            self.questions.put((conn, header, time.monotonic()))
        elif op in (P.OP_EXEC, P.OP_TABLES, P.OP_FETCH):
            self.jobs.put((conn, header, payloads))
        else:
            _safe_send(conn, P.error_event("UnknownOperation", f"unknown op {op!r}", re=re))
            _safe_send(conn, {"ev": P.EV_DONE, "re": re, "status": "error"})

    def _cancel_if_running(self, conn, target) -> bool:
        with self.running_lock:
            if self.running and self.running[0] is conn and (target is None or self.running[1] == target):
                signal.pthread_kill(self.main_thread, signal.SIGINT)
                return True
        return False

    def _answer_loop(self) -> None:
        while True:
            with self._question_lock:
                self._idle_question_threads += 1
            conn, header, asked = self.questions.get()
            with self._question_lock:
                self._idle_question_threads -= 1
            re = header.get("id")
            if time.monotonic() - asked > float(header.get("deadline_s") or 30):
                continue  # the host has given up on this one: do not spend time on it
            try:
                if header.get("op") == P.OP_COMPLETE:
                    reply = self.complete(header.get("code", ""), int(header.get("cursor_pos", 0)))
                else:
                    reply = self.inspect(header.get("code", ""), int(header.get("cursor_pos", 0)),
                                         int(header.get("detail_level", 0)))
                _safe_send(conn, {"ev": P.EV_DONE, "re": re, "status": "ok", **reply})
            except Exception as e:  # noqa: BLE001 - a failed answer is an error reply, never a dead thread
                _safe_send(conn, P.error_event(type(e).__name__, str(e), re=re))
                _safe_send(conn, {"ev": P.EV_DONE, "re": re, "status": "error"})

    def warm_introspection(self) -> None:
        """Import and exercise jedi before the snapshot, so the first Tab in a clone answers at once."""
        # What the first Tabs of a session touch: the names of a module (which makes jedi read typing and
        # types), Deephaven's API, a table's methods, the common data libraries, builtins.
        for code in ("import os\nos.pa", "import os\nos.path.jo", "import sys\nsys.", "import typing\ntyping.",
                     "import types\ntypes.", "import datetime\ndatetime.", "import collections\ncollections.",
                     "import deephaven\ndeephaven.", "from deephaven import empty_table\nempty_table(1).up",
                     "import numpy as np\nnp.", "import pandas as pd\npd.", "import matplotlib.pyplot as plt\nplt.",
                     "pri"):
            try:
                self.complete(code, len(code))
                self.inspect(code, len(code) - 2, 0)
            except Exception as e:  # noqa: BLE001 - warming is best effort
                _log(f"introspection warm-up: {type(e).__name__}: {e}")

    # -- requests ----------------------------------------------------------------------------

    def complete(self, code: str, cursor_pos: int) -> dict:
        """Completions from the live namespace (jedi), and column names inside query strings."""
        return _agent_complete(self, code, cursor_pos)

    def inspect(self, code: str, cursor_pos: int, detail_level: int = 0) -> dict:
        """What Shift-Tab / ``?`` shows for the name at the cursor (tables: size and columns)."""
        return _agent_inspect(self, code, cursor_pos, detail_level)

    def hello_info(self) -> dict:
        return {"version": P.PROTOCOL_VERSION, "agent_version": AGENT_VERSION,
                "deephaven_version": self.dh.version, "python": sys.version.split()[0],
                "server": {"host": self.dh.host, "port": self.dh.port, "auth": "psk",
                           "key_set": self.dh.has_key},
                "workdir": str(self.workdir), "tmpdir": tempfile.gettempdir(), "pid": os.getpid(),
                "startup_ms": round(self.dh.started_ms, 1)}

    def stats(self) -> dict:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        out = {"cells": self.cells, "uptime_s": round(time.time() - self.started, 1),
               "max_rss_bytes": usage.ru_maxrss * 1024, "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
               "tables": sum(1 for v in list(self.ns.values()) if self.dh.is_table(v)), **self.clock.describe()}
        try:
            out.update(self.dh.jvm_memory())
        except Exception:
            pass
        return out

    def _handle_job(self, conn: P.FrameStream, header: dict, payloads: list) -> None:
        op, re = header.get("op"), header.get("id")
        try:
            if op == P.OP_EXEC:
                self.execute(conn, header, payloads)
                return
            if op == P.OP_TABLES:
                tables = [{"name": n, **self.dh.describe(v)} for n, v in list(self.ns.items())
                          if not n.startswith("_") and self.dh.is_table(v)]
                _safe_send(conn, {"ev": P.EV_DONE, "re": re, "status": "ok", "tables": tables})
            elif op == P.OP_FETCH:
                name = header.get("name", "")
                table = self.ns.get(name)
                if not self.dh.is_table(table):
                    raise KeyError(f"no Deephaven table named {name!r} in the session")
                head, ipc = self.dh.table_payload(name, table, header.get("max_rows"))
                _safe_send(conn, {**head, "re": re}, [ipc])
                _safe_send(conn, {"ev": P.EV_DONE, "re": re, "status": "ok"})
        except BaseException as e:  # noqa: BLE001 - every failure goes back to the host
            _safe_send(conn, P.error_event(type(e).__name__, str(e), re=re))
            _safe_send(conn, {"ev": P.EV_DONE, "re": re, "status": "error"})

    def execute(self, conn: P.FrameStream, header: dict, payloads: list) -> None:
        re = header.get("id")
        opts = header.get("options") or {}
        max_rows = opts.get("max_rows", 1000)
        timings: dict[str, float] = {}
        status = "ok"
        out_tables: list[str] = []
        t0 = time.perf_counter()
        try:
            files = header.get("files") or []
            if files:
                write_files(self.workdir, files, payloads)
            timings["write_files_ms"] = _ms(t0)
        except (FileRejected, OSError) as e:
            _safe_send(conn, P.error_event(type(e).__name__, str(e), re=re))
            _safe_send(conn, {"ev": P.EV_DONE, "re": re, "status": "error", "timings": timings, "tables": []})
            return

        self.cells += 1
        filename = f"<dhvm-cell-{self.cells}>"
        code = header.get("code", "")
        linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
        before = {n: id(v) for n, v in list(self.ns.items()) if self.dh.is_table(v)}
        before_figures = {n: id(v) for n, v in list(self.ns.items()) if rich.is_deephaven_figure(v)}
        last_value, last_name = None, None
        displayed: set[int] = set()  # tables display() showed: not shown again at the end

        def send_table(table, _kind: str) -> None:
            displayed.add(id(table))
            name = next((n for n, v in list(self.ns.items()) if v is table and not n.startswith("_")), "table")
            head, ipc = self.dh.table_payload(name, table, max_rows)
            _safe_send(conn, {**head, "re": re, "display": True}, [ipc])

        rich.outlet.send_table = send_table
        rich.outlet.begin(lambda h, p: _safe_send(conn, h, p), re)
        t1 = time.perf_counter()
        saved = sys.stdout, sys.stderr
        sys.stdout = EventStream(conn.send, re, P.EV_STDOUT)
        sys.stderr = EventStream(conn.send, re, P.EV_STDERR)
        try:
            with self.running_lock:
                self.running = (conn, re)
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
            with self.running_lock:
                self.running = None
            _safe_send(conn, _cell_error_event(e, code, re))
            _close_figures()
        finally:
            with self.running_lock:
                self.running = None
            sys.stdout, sys.stderr = saved
        timings["exec_ms"] = _ms(t1)

        t2 = time.perf_counter()
        try:
            changed = [(n, v) for n, v in list(self.ns.items())
                       if not n.startswith("_") and self.dh.is_table(v) and before.get(n) != id(v)
                       and id(v) not in displayed]
            if self.dh.is_table(last_value) and all(v is not last_value for _, v in changed):
                changed.append((last_name, last_value))
            elif rich.is_deephaven_figure(last_value):
                name = last_name if last_name and last_name.isidentifier() else None
                _safe_send(conn, {"ev": P.EV_RESULT, "re": re, "data": rich.deephaven_figure_bundle(last_value, name=name)})
            elif last_value is not None and not self.dh.is_table(last_value):
                data, blobs = rich.result_bundle(last_value)
                _safe_send(conn, {"ev": P.EV_RESULT, "re": re, "data": data}, blobs)
            # Deephaven Figures the cell made (or rebound) and did not return: a link each, like tables.
            for n, v in list(self.ns.items()):
                if not n.startswith("_") and rich.is_deephaven_figure(v) and before_figures.get(n) != id(v) \
                        and v is not last_value:
                    rich.publish(rich.deephaven_figure_bundle(v, name=n))
            for name, table in changed:
                head, ipc = self.dh.table_payload(name, table, max_rows)
                _safe_send(conn, {**head, "re": re}, [ipc])
                out_tables.append(name)
        except BaseException as e:  # noqa: BLE001
            status = "error"
            _safe_send(conn, P.error_event(type(e).__name__, f"while fetching result tables: {e}",
                                           _cell_traceback(e), re=re))
        rich.outlet.end()
        timings["fetch_ms"] = _ms(t2)
        timings["total_ms"] = _ms(t0)
        _safe_send(conn, {"ev": P.EV_DONE, "re": re, "status": status, "timings": timings, "tables": out_tables})


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


_COLUMN_CONTEXT = re.compile(r"(\w+)\s*\.\s*\w+\((?:[^()]*?)[\"']([^\"']*)$")


def _safe_repr(value) -> str:
    try:
        return repr(value)
    except Exception as e:  # noqa: BLE001 - a broken __repr__ must not fail an inspection
        return f"<{type(value).__name__} (repr failed: {e})>"


def _close_figures() -> None:
    """A failed cell's half-drawn figures are dropped, not shown with the next cell."""
    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is not None:
        pyplot.close("all")


def _line_col(code: str, cursor_pos: int) -> tuple[int, int]:
    before = code[:cursor_pos]
    return before.count("\n") + 1, len(before) - (before.rfind("\n") + 1)


def _resolve(ns: dict, dotted: str):
    """The object a dotted name refers to in ``ns`` (attribute lookups only, no calls)."""
    head, *rest = dotted.split(".")
    obj = ns[head] if head in ns else getattr(builtins, head)
    for part in rest:
        obj = getattr(obj, part)
    return obj


def _agent_complete(agent: "Agent", code: str, cursor_pos: int) -> dict:
    before = code[:cursor_pos]
    ctx = _COLUMN_CONTEXT.search(before)
    if ctx and agent.dh.is_table(agent.ns.get(ctx.group(1))):
        # Inside a query string on a table: offer its column names.
        frag = re.search(r"(\w*)$", ctx.group(2)).group(1)
        cols = [c.name for c in agent.ns[ctx.group(1)].columns if c.name.startswith(frag)]
        if cols:
            return {"matches": cols, "cursor_start": cursor_pos - len(frag), "cursor_end": cursor_pos,
                    "types": ["column"] * len(cols)}
    import jedi

    line, col = _line_col(code, cursor_pos)
    comps = jedi.Interpreter(code, [agent.ns]).complete(line, col)[:1000]
    typed = len(comps[0].name) - len(comps[0].complete) if comps else 0
    return {"matches": [c.name for c in comps], "cursor_start": cursor_pos - typed, "cursor_end": cursor_pos,
            "types": [c.type for c in comps]}


def _callee_at(code: str, cursor_pos: int) -> str:
    """The dotted name of the call whose arguments the cursor is in (``t.update(`` -> ``t.update``),
    as a plain kernel's Shift-Tab finds it; "" when the cursor is in no call."""
    depth = 0
    for i in range(cursor_pos - 1, -1, -1):
        ch = code[i]
        if ch in ")]}":
            depth += 1
        elif ch in "([{":
            if depth > 0:
                depth -= 1
            elif ch == "(":
                m = re.search(r"([\w.]+)\s*$", code[:i])
                return m.group(1).strip(".") if m else ""
            # an open list or dict at this level: the call (if any) is further out
        elif ch == "\n" and depth == 0 and not code[:i].rstrip().endswith((",", "(", "\\")):
            return ""  # a new statement: no open call around the cursor
    return ""


def _agent_inspect(agent: "Agent", code: str, cursor_pos: int, detail_level: int) -> dict:
    left = re.search(r"([\w.]+)$", code[:cursor_pos])
    right = re.match(r"\w*", code[cursor_pos:])
    dotted = ((left.group(1) if left else "") + (right.group(0) if right else "")).strip(".")
    if not dotted:
        dotted = _callee_at(code, cursor_pos)
    if not dotted:
        return {"found": False, "data": {}}
    try:
        obj = _resolve(agent.ns, dotted)
    except Exception:  # noqa: BLE001 - unknown names are simply not found
        return {"found": False, "data": {}}
    import inspect as pyinspect

    lines = [f"{dotted}: {type(obj).__module__}.{type(obj).__qualname__}"]
    if agent.dh.is_table(obj):
        lines.append(f"Deephaven table: {obj.size:,} rows{' (ticking)' if obj.is_refreshing else ''}")
        lines.append("Columns:")
        lines.extend(f"  {c.name:<24} {c.data_type}" for c in obj.columns)
    else:
        try:
            lines.append(f"Signature: {dotted}{pyinspect.signature(obj)}")
        except (TypeError, ValueError):
            pass
        if not callable(obj):
            lines.append(f"Value: {_safe_repr(obj)[:500]}")
    doc = pyinspect.getdoc(obj)
    if doc and (detail_level > 0 or not agent.dh.is_table(obj)):
        lines.append("Docstring:\n" + doc)
    if detail_level > 0:
        try:
            lines.append("Source:\n" + pyinspect.getsource(obj))
        except (TypeError, OSError):
            pass
    return {"found": True, "data": {"text/plain": "\n".join(lines)}}


_RNDADDENTROPY = 0x40085203  # _IOW('R', 0x03, int[2])
_RNDRESEEDCRNG = 0x5207  # _IO('R', 0x07)


def _mix_kernel_entropy(data: bytes) -> dict:
    """Credit host entropy to the guest kernel and force its generator to reseed now.

    A plain write to /dev/urandom only mixes the pool: clones restored from one snapshot would go on
    reading identical bytes until the next scheduled reseed. The ioctls need root (the VM's agent is).
    """
    out: dict = {"entropy_bytes": len(data)}
    try:
        fd = os.open("/dev/urandom", os.O_WRONLY)
        try:
            words = len(data) // 4
            info = struct.pack("ii", words * 32, words * 4) + data[: words * 4]
            fcntl.ioctl(fd, _RNDADDENTROPY, info)
            fcntl.ioctl(fd, _RNDRESEEDCRNG)
            out["kernel_reseeded"] = True
        finally:
            os.close(fd)
    except OSError as e:  # not root (local backend): the kernel is the host's own, already unique
        out["kernel_reseeded"] = False
        out["entropy_note"] = str(e)
    return out


class Clock:
    """Keeps a VM's wall clock on the host's.

    Under emulation the guest's clocksource loses ticks whenever the host is busy (20 s behind after
    ten loaded minutes was measured), so the host's time travels with every request and with a
    periodic notice; when the guest is further off than CLOCK_TOLERANCE_NS it is stepped (a frame's
    transit is well under that). Only in a VM (``--sync-clock``): a local agent shares the host's clock.
    """

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.steps = 0
        self.last_skew_ns = 0
        self.max_skew_ns = 0
        self._lock = threading.Lock()

    def observe(self, host_ns) -> dict:
        """Compare with the host's ``host_ns`` (sent a moment ago) and step the clock if needed."""
        out: dict = {}
        if not isinstance(host_ns, int):
            return out
        with self._lock:
            skew = host_ns - time.time_ns()
            self.last_skew_ns = skew
            self.max_skew_ns = max(self.max_skew_ns, abs(skew))
            out["clock_skew_ms"] = round(skew / 1e6, 3)
            if self.enabled and abs(skew) > CLOCK_TOLERANCE_NS:
                try:
                    time.clock_settime_ns(time.CLOCK_REALTIME, time.time_ns() + skew)
                    self.steps += 1
                    out["clock_set"] = True
                except OSError as e:  # setting needs root (the VM's agent is)
                    out["clock_set"] = False
                    out["clock_error"] = str(e)
        return out

    def describe(self) -> dict:
        return {"clock_sync": self.enabled, "clock_steps": self.steps,
                "clock_last_skew_ms": round(self.last_skew_ns / 1e6, 3),
                "clock_max_skew_ms": round(self.max_skew_ns / 1e6, 3)}


def after_restore(header: dict, payloads: list, dh: "Deephaven | None" = None, clock: "Clock | None" = None) -> dict:
    """After a snapshot restore: take the host's wall clock, entropy and this VM's login key, so
    clones of one snapshot neither live in the past, nor draw the same random numbers, nor share a key."""
    out: dict = {}
    host_ns = header.get("time_ns")
    if host_ns is not None:
        out.update((clock or Clock(enabled=True)).observe(host_ns))
    host_entropy = bytes(payloads[0]) if payloads else b""
    if host_entropy:
        out.update(_mix_kernel_entropy(host_entropy))
    # Seed from the host's bytes as well as the kernel: even if the guest kernel's generator was not
    # reseeded yet, clones must not share random streams.
    seed = int.from_bytes(hashlib.sha512(host_entropy + os.urandom(32)).digest(), "big")
    import random

    random.seed(seed)
    try:
        import numpy

        numpy.random.seed(seed % 2**32)
    except ImportError:
        pass
    if dh is not None:
        t0 = time.perf_counter()
        try:
            out["java_threads_reseeded"] = reseed_java(seed)
        except Exception as e:  # noqa: BLE001 - reported to the host, which shows it in status
            out["java_reseed_error"] = f"{type(e).__name__}: {e}"
        out["java_reseed_ms"] = _ms(t0)
        key = header.get("key")
        if key:
            dh.set_key(key)
        out["key_set"] = dh.has_key
    out["time_ns"] = time.time_ns()
    return out


def reseed_java(seed: int) -> int:
    """Fresh Java random state (ThreadLocalRandom in every thread, Math.random, new Random) from ``seed``."""
    import jpy

    return int(jpy.get_type("dhg.Reseed").reseed(seed % 2**64 - 2**63))  # a signed Java long


def _ms(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1000, 3)


def _safe_send(conn: P.FrameStream, header: dict, payloads=()) -> None:
    try:
        conn.send(header, payloads)
    except OSError:
        pass  # the host is gone; nothing to tell


def _java_field(text: str, label: str) -> str | None:
    """``Label : value`` from a Deephaven (Java) error text, e.g. "Exception message : Cannot find …"."""
    m = re.search(rf"^\s*{re.escape(label)}\s*:\s*(\S.*)$", text, re.M)
    return m.group(1).strip() if m else None


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


def _cell_error_event(exc: BaseException, code: str, re_id) -> dict:
    """The error event of a failed cell: a short value and summary first, the whole traceback after."""
    summary = _error_summary(exc, code)
    value = str(exc)
    if summary:
        value = summary[0].split(": ", 1)[-1]  # the full text is in the traceback
    return P.error_event(type(exc).__name__, value, _cell_traceback(exc), re=re_id, summary=summary)


def _cell_traceback(exc: BaseException) -> list[str]:
    """The traceback lines of a cell error, without the agent's own frames."""
    tb = exc.__traceback__
    while tb is not None and not tb.tb_frame.f_code.co_filename.startswith("<dhvm-cell-"):
        tb = tb.tb_next
    if tb is None and isinstance(exc, SyntaxError):
        return traceback.format_exception_only(type(exc), exc)
    return traceback.format_exception(type(exc), exc, tb)


def _fresh_main() -> dict:
    """Give Deephaven's script scope (``__main__``) a clean namespace instead of this module's globals."""
    fresh = types.ModuleType("__main__")
    fresh.__dict__["__builtins__"] = builtins
    sys.modules.setdefault("dhg_agent", sys.modules["__main__"])
    sys.modules["__main__"] = fresh
    return fresh.__dict__


def _watch_owner(pid: int) -> None:
    """Exit when the owning host process dies, so a killed kernel leaves no agent behind."""
    # The owner is our parent: when it dies we are re-parented (even while it lingers as a zombie).
    while True:
        time.sleep(0.5)
        if os.getppid() != pid:
            _log(f"owner process {pid} is gone; exiting")
            os._exit(0)


def listen_unix(path: str) -> socket.socket:
    """A listening unix socket at ``path``, mode 0600, replacing a stale one."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        # A deep DHG_HOME can exceed the 108-byte sun_path limit; bind relative to the cwd then.
        sock.bind(path if len(path) < 100 else os.path.relpath(path))
    finally:
        os.umask(old)
    sock.listen(8)
    return sock


def listen_vsock(port: int) -> socket.socket:
    """A listening AF_VSOCK socket on ``port`` for any CID. A listening socket survives a snapshot
    (connections do not), so a restored agent takes new hosts at once."""
    sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    sock.bind((socket.VMADDR_CID_ANY, port))
    sock.listen(8)
    return sock


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="dhg guest agent: Deephaven + cell executor over the dhg protocol")
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--socket", help="unix socket path to listen on")
    where.add_argument("--serial", help="virtio-serial port to serve on (e.g. /dev/virtio-ports/dhg.agent)")
    where.add_argument("--vsock-port", type=int, help="AF_VSOCK port to listen on (Firecracker's hybrid vsock)")
    ap.add_argument("--workdir", required=True, help="working directory; pushed files land here")
    ap.add_argument("--dh-host", default="127.0.0.1")
    ap.add_argument("--dh-port", type=int, default=0, help="Deephaven port (0: a free one)")
    ap.add_argument("--heap", default=os.environ.get("DHG_HEAP", "2g"), help="JVM heap (-Xmx)")
    ap.add_argument("--classes", required=True, help="the agent's compiled Java classes (dhg.TokenAuthHandler, dhg.Reseed)")
    ap.add_argument("--sync-clock", action="store_true", help="keep the wall clock on the host's (a VM's agent)")
    ap.add_argument("--owner-pid", type=int, default=0, help="exit when this host process is gone (local backend)")
    args = ap.parse_args(argv)
    if args.owner_pid:
        threading.Thread(target=_watch_owner, args=(args.owner_pid,), name="dhg-owner", daemon=True).start()

    # Figures are drawn off screen and shown in the notebook (rich.py); set before anything imports matplotlib.
    os.environ.setdefault("MPLBACKEND", "Agg")
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    os.chdir(workdir)  # Deephaven resolves relative paths (read_csv("data/x.csv")) against it
    ns = _fresh_main()
    # The login key of a local agent comes in the environment (never argv); a VM's comes after each restore.
    key = os.environ.pop("DHG_KEY", None)
    dh = Deephaven(args.dh_host, args.dh_port, args.heap, Path(args.classes))
    _log(f"starting Deephaven on {dh.host}:{dh.port}")
    dh.start()
    if key:
        dh.set_key(key)
    dh.warm_up()
    # Also loads the reseeder's class and reflection before a snapshot, so a restore pays little for it.
    reseed_java(int.from_bytes(os.urandom(16), "big"))
    agent = Agent(workdir, dh, ns, Clock(enabled=args.sync_clock))
    rich.install(ns)
    rich.outlet.is_table = dh.is_table
    rich.warm_up()
    rich.patch_pyplot()
    agent.warm_introspection()
    where = args.socket or args.serial or f"vsock port {args.vsock_port}"
    _log(f"Deephaven {dh.version} ready in {dh.started_ms:.0f} ms; serving on {where}")
    if args.serial:
        agent.serve_serial(args.serial)
    elif args.vsock_port is not None:
        agent.serve(listen_vsock(args.vsock_port))
    else:
        agent.serve(listen_unix(args.socket))


if __name__ == "__main__":
    main()
