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
except ImportError:  # inside the VM image protocol.py sits beside this file
    import protocol as P  # type: ignore[no-redef]

AGENT_VERSION = "0.1.0"
_ARROW_EOS = b"\xff\xff\xff\xff\x00\x00\x00\x00"


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

    def __init__(self, host: str, port: int, heap: str, psk: str | None):
        self.host = host
        self.port = port or _free_port(host)
        self.heap = heap
        self.psk = psk
        self.version = "?"
        self.started_ms = 0.0

    def start(self) -> None:
        t0 = time.perf_counter()
        from deephaven_server import Server

        if self.psk:
            auth = ["-DAuthHandlers=io.deephaven.authentication.psk.PskAuthenticationHandler",
                    f"-Dauthentication.psk={self.psk}"]
        else:
            auth = ["-DAuthHandlers=io.deephaven.auth.AnonymousAuthenticationHandler"]
        # -Xrs: the JVM leaves SIGINT to Python, which is how a cancel interrupts a cell.
        # Java's temp files (Jetty's work dir, extracted native libraries) go where Python's go: the
        # instance's own directory for a local agent, so they vanish with it; no hsperfdata files.
        jvm = [f"-Xmx{self.heap}", "-Xrs", f"-Djava.io.tmpdir={tempfile.gettempdir()}", "-XX:-UsePerfData"]
        self.server = Server(host=self.host, port=self.port, jvm_args=[*jvm, *auth])
        self.server.start()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            from importlib.metadata import version

            self.version = version("deephaven-server")
        except Exception:
            pass
        self.started_ms = (time.perf_counter() - t0) * 1000

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
        if table.is_refreshing:
            table = table.snapshot()  # one consistent view of a ticking table
        total = int(table.size)
        sent = table if max_rows is None or total <= max_rows else table.head(max_rows)
        ipc = self.arrow_ipc(sent)
        header = {"ev": P.EV_TABLE, "name": name, **self.describe(table), "rows": total,
                  "sent_rows": min(total, max_rows) if max_rows is not None else total,
                  "truncated": max_rows is not None and total > max_rows}
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

    def __init__(self, workdir: Path, dh: Deephaven, namespace: dict):
        self.workdir = workdir
        self.dh = dh
        self.ns = namespace
        self.jobs: queue.Queue = queue.Queue()
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
            info = after_restore(header, payloads)
            # A clone's life starts now (read after the clock was set): the snapshot's warm-up cells
            # and uptime are not its own.
            self.cells, self.started = 0, time.time()
            _safe_send(conn, {"ev": P.EV_DONE, "re": re, "status": "ok", **info})
        elif op == P.OP_STATS:
            _safe_send(conn, {"ev": P.EV_DONE, "re": re, "status": "ok", **self.stats()})
        elif op in (P.OP_EXEC, P.OP_TABLES, P.OP_FETCH, P.OP_COMPLETE, P.OP_INSPECT):
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
                "server": {"host": self.dh.host, "port": self.dh.port, "auth": "psk" if self.dh.psk else "anonymous"},
                "workdir": str(self.workdir), "tmpdir": tempfile.gettempdir(), "pid": os.getpid(),
                "startup_ms": round(self.dh.started_ms, 1)}

    def stats(self) -> dict:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        out = {"cells": self.cells, "uptime_s": round(time.time() - self.started, 1),
               "max_rss_bytes": usage.ru_maxrss * 1024, "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
               "tables": sum(1 for v in list(self.ns.values()) if self.dh.is_table(v))}
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
            elif op == P.OP_COMPLETE:
                reply = self.complete(header.get("code", ""), int(header.get("cursor_pos", 0)))
                _safe_send(conn, {"ev": P.EV_DONE, "re": re, "status": "ok", **reply})
            elif op == P.OP_INSPECT:
                reply = self.inspect(header.get("code", ""), int(header.get("cursor_pos", 0)),
                                     int(header.get("detail_level", 0)))
                _safe_send(conn, {"ev": P.EV_DONE, "re": re, "status": "ok", **reply})
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
        last_value, last_name = None, None
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
                last_name = (ast.get_source_segment(code, last_expr) or "_")[:80]
        except BaseException as e:  # noqa: BLE001 - KeyboardInterrupt (cancel) and SystemExit included
            status = "cancelled" if isinstance(e, KeyboardInterrupt) else "error"
            with self.running_lock:
                self.running = None
            _safe_send(conn, P.error_event(type(e).__name__, str(e), _cell_traceback(e), re=re))
        finally:
            with self.running_lock:
                self.running = None
            sys.stdout, sys.stderr = saved
        timings["exec_ms"] = _ms(t1)

        t2 = time.perf_counter()
        try:
            changed = [(n, v) for n, v in list(self.ns.items())
                       if not n.startswith("_") and self.dh.is_table(v) and before.get(n) != id(v)]
            if self.dh.is_table(last_value) and all(v is not last_value for _, v in changed):
                changed.append((last_name, last_value))
            elif last_value is not None and not self.dh.is_table(last_value):
                _safe_send(conn, {"ev": P.EV_RESULT, "re": re, "data": _mime_bundle(last_value)})
            for name, table in changed:
                head, ipc = self.dh.table_payload(name, table, max_rows)
                _safe_send(conn, {**head, "re": re}, [ipc])
                out_tables.append(name)
        except BaseException as e:  # noqa: BLE001
            status = "error"
            _safe_send(conn, P.error_event(type(e).__name__, f"while fetching result tables: {e}",
                                           _cell_traceback(e), re=re))
        timings["fetch_ms"] = _ms(t2)
        timings["total_ms"] = _ms(t0)
        _safe_send(conn, {"ev": P.EV_DONE, "re": re, "status": status, "timings": timings, "tables": out_tables})


_COLUMN_CONTEXT = re.compile(r"(\w+)\s*\.\s*\w+\((?:[^()]*?)[\"']([^\"']*)$")
_MAX_REPR = 100_000


def _mime_bundle(value) -> dict:
    """A small MIME bundle for a cell's last expression (text, and HTML when the object has it)."""
    try:
        text = repr(value)
    except Exception as e:  # noqa: BLE001 - a broken __repr__ must not fail the cell
        text = f"<{type(value).__name__} (repr failed: {e})>"
    data = {"text/plain": text[:_MAX_REPR]}
    html_repr = getattr(value, "_repr_html_", None)
    if callable(html_repr) and not isinstance(value, type):
        try:
            html_text = html_repr()
            if isinstance(html_text, str):
                data["text/html"] = html_text[:_MAX_REPR]
        except Exception:  # noqa: BLE001
            pass
    return data


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


def _agent_inspect(agent: "Agent", code: str, cursor_pos: int, detail_level: int) -> dict:
    left = re.search(r"([\w.]+)$", code[:cursor_pos])
    right = re.match(r"\w*", code[cursor_pos:])
    dotted = ((left.group(1) if left else "") + (right.group(0) if right else "")).strip(".")
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
            lines.append(f"Value: {_mime_bundle(obj)['text/plain'][:500]}")
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


def after_restore(header: dict, payloads: list) -> dict:
    """After a snapshot restore: take the host's wall clock and entropy, so clones of one snapshot
    neither live in the past nor draw the same random numbers."""
    out: dict = {}
    host_ns = header.get("time_ns")
    if host_ns is not None:
        skew = host_ns - time.time_ns()
        out["clock_skew_ms"] = round(skew / 1e6, 3)
        if abs(skew) > 50_000_000:  # only a stale clock is set (setting needs root: the VM's agent is)
            try:
                time.clock_settime_ns(time.CLOCK_REALTIME, host_ns)
                out["clock_set"] = True
            except OSError as e:
                out["clock_set"] = False
                out["clock_error"] = str(e)
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
    out["time_ns"] = time.time_ns()
    return out


def _ms(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1000, 3)


def _safe_send(conn: P.FrameStream, header: dict, payloads=()) -> None:
    try:
        conn.send(header, payloads)
    except OSError:
        pass  # the host is gone; nothing to tell


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
    ap.add_argument("--psk", default=os.environ.get("DHG_PSK") or None, help="pre-shared key auth instead of anonymous")
    ap.add_argument("--owner-pid", type=int, default=0, help="exit when this host process is gone (local backend)")
    args = ap.parse_args(argv)
    if args.owner_pid:
        threading.Thread(target=_watch_owner, args=(args.owner_pid,), name="dhg-owner", daemon=True).start()

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    os.chdir(workdir)  # Deephaven resolves relative paths (read_csv("data/x.csv")) against it
    ns = _fresh_main()
    dh = Deephaven(args.dh_host, args.dh_port, args.heap, args.psk)
    _log(f"starting Deephaven on {dh.host}:{dh.port}")
    dh.start()
    dh.warm_up()
    agent = Agent(workdir, dh, ns)
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
