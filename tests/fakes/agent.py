"""A fake guest agent: the real wire protocol (``dhg_kernel.protocol``), no Deephaven, no JVM.

It answers the ops the host sends (hello, exec, cancel, tables, fetch, stats, complete, inspect, web,
clock) the way ``guest/agent.py`` does, so sessions and the magic can be tested in milliseconds: a
cell's Python runs with ``exec()`` in the agent's own namespace, its prints go back as stdout/stderr
events while it runs, its last expression as a result event, its error as an error event, then done.

Run as ``python tests/fakes/agent.py --socket PATH --workdir DIR [--delay S] [--hello-delay S]``.
A cell can misbehave on purpose through the ``fake_agent`` object in its namespace:

- ``fake_agent.die(status)``: the agent process exits at once, in the middle of the cell;
- ``fake_agent.hang()``: the cell never ends, and a cancel does not stop it (a stuck agent);
- ``fake_agent.received``: the paths of every file pushed to this agent so far, in order.

``--delay S`` makes every answer (each done) wait S seconds: a slow agent. Only the standard library
and ``dhg_kernel.protocol`` are imported, so the agent starts in a few tens of milliseconds.
"""

from __future__ import annotations

import argparse
import ast
import os
import queue
import signal
import socket
import sys
import threading
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from dhg_kernel import protocol as P  # noqa: E402

AGENT_VERSION = "fake-1"
FAKE_DEEPHAVEN_VERSION = "0.0.0-fake"


class FakeTable:
    """A stand-in for a Deephaven table: ``tables`` lists it (name, rows, columns), nothing more."""

    def __init__(self, **columns: list):
        self.columns = columns

    @property
    def rows(self) -> int:
        return len(next(iter(self.columns.values()), []))


class Controls:
    """``fake_agent`` in a cell's namespace: how a test makes the agent misbehave."""

    def __init__(self):
        self.received: list[str] = []

    def die(self, status: int = 3) -> None:
        """Exit the agent process now (no done, no goodbye): the host sees its stream end mid-cell."""
        sys.stdout.flush()
        os._exit(status)

    def hang(self) -> None:
        """Never return, whatever cancel says (each KeyboardInterrupt is swallowed)."""
        while True:
            try:
                time.sleep(3600)
            except KeyboardInterrupt:
                continue


class Link:
    """One host connection: a frame stream whose sends are serialised."""

    def __init__(self, sock: socket.socket):
        self.stream = P.FrameStream(sock)

    def send(self, header: dict, payloads=()) -> None:
        try:
            self.stream.send(header, payloads)
        except OSError:
            pass  # the host went away


class EventWriter:
    """sys.stdout/sys.stderr during a cell: every write is an event of the running request."""

    def __init__(self, link: Link, rid, ev: str):
        self.link, self.rid, self.ev = link, rid, ev

    def write(self, text: str) -> int:
        for piece in P.text_chunks(str(text)):
            self.link.send({"ev": self.ev, "re": self.rid, "text": piece})
        return len(text)

    def flush(self) -> None:
        pass


class FakeAgent:
    """Answers requests: the cheap ones on the connection's reader thread, cells on the main thread."""

    def __init__(self, workdir: Path, delay: float = 0.0):
        self.workdir = workdir
        self.delay = delay
        self.controls = Controls()
        self.ns: dict = {"__name__": "__main__", "fake_agent": self.controls, "FakeTable": FakeTable}
        self.jobs: queue.Queue = queue.Queue()
        self.cells = 0
        self.started = time.time()
        self.running = None  # (link, request id) of the running cell
        self.lock = threading.Lock()

    # -- connections ---------------------------------------------------------------------------

    def accept_loop(self, listener: socket.socket) -> None:
        while True:
            sock, _ = listener.accept()
            threading.Thread(target=self.read_loop, args=(Link(sock),), daemon=True).start()

    def read_loop(self, link: Link) -> None:
        while True:
            try:
                frame = link.stream.recv()
            except (P.ConnectionClosed, OSError):
                return
            except P.ProtocolError as e:
                link.send(P.error_event("ProtocolError", str(e)))
                if not e.recoverable:
                    return
                continue
            op, rid = frame.header.get("op"), frame.header.get("id")
            if op in (P.OP_EXEC, P.OP_TABLES, P.OP_FETCH):
                self.jobs.put((link, frame))
            elif op == P.OP_CLOCK:
                continue
            elif op == P.OP_CANCEL:
                self.answer(link, rid, {"cancelled": self.cancel(link, frame.header.get("target"))})
            else:
                self.answer_with(link, frame, self.inline_handler(op))

    def serve(self) -> None:
        """Run cells (and tables, fetch) one at a time on the main thread, as the real agent does."""
        while True:
            try:
                link, frame = self.jobs.get()
            except KeyboardInterrupt:  # a cancel that came just after its cell ended
                continue
            handler = {P.OP_EXEC: self.execute, P.OP_TABLES: self.tables, P.OP_FETCH: self.fetch}[frame.header["op"]]
            self.answer_with(link, frame, handler)

    def answer(self, link: Link, rid, reply: dict) -> None:
        if self.delay:
            time.sleep(self.delay)
        link.send({"ev": P.EV_DONE, "re": rid, "status": "ok", **reply})

    def answer_with(self, link: Link, frame: P.Frame, handler) -> None:
        rid = frame.header.get("id")
        try:
            reply = handler(link, frame)
        except Exception as e:  # noqa: BLE001 - every failure goes back to the host
            link.send(P.error_event(type(e).__name__, str(e), re=rid))
            reply = {"status": "error"}
        self.answer(link, rid, reply)

    def cancel(self, link: Link, target) -> bool:
        with self.lock:
            if self.running and self.running[0] is link and target in (None, self.running[1]):
                signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
                return True
        return False

    # -- requests --------------------------------------------------------------------------------

    def inline_handler(self, op):
        return {P.OP_HELLO: self.hello, P.OP_STATS: self.stats, P.OP_COMPLETE: self.complete,
                P.OP_INSPECT: self.inspect, P.OP_WEB: self.web}.get(op, self.unknown)

    def hello(self, link: Link, frame: P.Frame) -> dict:
        return {"version": P.PROTOCOL_VERSION, "agent_version": AGENT_VERSION,
                "deephaven_version": FAKE_DEEPHAVEN_VERSION, "python": sys.version.split()[0],
                "server": {"host": "127.0.0.1", "port": 0, "auth": "psk", "key_set": False},
                "workdir": str(self.workdir), "tmpdir": str(self.workdir), "pid": os.getpid(), "startup_ms": 0.0}

    def stats(self, link: Link, frame: P.Frame) -> dict:
        return {"cells": self.cells, "uptime_s": round(time.time() - self.started, 1), "tables": len(self._tables()),
                "live_views": 0}

    def complete(self, link: Link, frame: P.Frame) -> dict:
        code, pos = frame.header.get("code", ""), int(frame.header.get("cursor_pos", 0))
        start = pos
        while start > 0 and (code[start - 1].isalnum() or code[start - 1] == "_"):
            start -= 1
        prefix = code[start:pos]
        return {"matches": sorted(n for n in self.ns if n.startswith(prefix) and not n.startswith("__")),
                "cursor_start": start, "cursor_end": pos}

    def inspect(self, link: Link, frame: P.Frame) -> dict:
        name = frame.header.get("code", "").strip()
        if name not in self.ns:
            return {"found": False, "data": {}}
        return {"found": True, "data": {"text/plain": f"{name}: {type(self.ns[name]).__name__}"}}

    def web(self, link: Link, frame: P.Frame) -> dict:
        return {"time_zone": frame.header.get("time_zone")}

    def unknown(self, link: Link, frame: P.Frame) -> dict:
        raise ValueError(f"unknown op {frame.header.get('op')!r}")

    def _tables(self) -> dict[str, FakeTable]:
        return {n: v for n, v in self.ns.items() if isinstance(v, FakeTable) and not n.startswith("_")}

    def tables(self, link: Link, frame: P.Frame) -> dict:
        return {"tables": [{"name": n, "rows": t.rows, "columns": [{"name": c, "type": "?"} for c in t.columns],
                            "refreshing": False} for n, t in self._tables().items()]}

    def fetch(self, link: Link, frame: P.Frame) -> dict:
        name = frame.header.get("name", "")
        raise KeyError(f"no Deephaven table named {name!r} in the session (the fake agent sends no table data)")

    def execute(self, link: Link, frame: P.Frame) -> dict:
        h, rid = frame.header, frame.header.get("id")
        files = h.get("files") or []
        for meta, data in zip(files, frame.payloads):
            target = self.workdir / meta["path"]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
            self.controls.received.append(meta["path"])
        self.cells += 1
        filename = f"<dhvm-cell-{h.get('execution_count') or self.cells}>"
        status, t0 = "ok", time.perf_counter()
        saved = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = EventWriter(link, rid, P.EV_STDOUT), EventWriter(link, rid, P.EV_STDERR)
        cwd = os.getcwd()
        try:
            os.chdir(self.workdir)
            with self.lock:
                self.running = (link, rid)
            tree = ast.parse(h.get("code", ""), filename)
            last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
            exec(compile(tree, filename, "exec"), self.ns)
            value = eval(compile(ast.Expression(last.value), filename, "eval"), self.ns) if last else None
            if value is not None:
                link.send({"ev": P.EV_RESULT, "re": rid, "data": {"text/plain": repr(value)}})
        except BaseException as e:  # noqa: BLE001 - a cancel (KeyboardInterrupt) included
            status = "cancelled" if isinstance(e, KeyboardInterrupt) else "error"
            link.send(P.error_event(type(e).__name__, str(e), traceback.format_exception(type(e), e, e.__traceback__),
                                    re=rid))
        finally:
            with self.lock:
                self.running = None
            sys.stdout, sys.stderr = saved
            os.chdir(cwd)
        return {"status": status, "tables": [], "timings": {"exec_ms": round((time.perf_counter() - t0) * 1000, 3)}}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--socket", required=True)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--delay", type=float, default=0.0, help="seconds every answer waits")
    ap.add_argument("--hello-delay", type=float, default=0.0, help="seconds before the socket listens")
    args = ap.parse_args(argv)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if args.hello_delay:
        time.sleep(args.hello_delay)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    os.chdir(os.path.dirname(os.path.abspath(args.socket)))  # bind by a short name: sun_path holds 108 bytes
    listener.bind(os.path.basename(args.socket))
    listener.listen(8)
    agent = FakeAgent(workdir, args.delay)
    threading.Thread(target=agent.accept_loop, args=(listener,), daemon=True).start()
    print(f"fake agent {os.getpid()} listening on {args.socket}", flush=True)
    agent.serve()


if __name__ == "__main__":
    main()
