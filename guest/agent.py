"""The guest agent: a Deephaven server plus a cell executor, served over the dhg wire protocol.

It runs inside the VM (or as a plain subprocess for the local backend), always as a module:
``python -m dhg_kernel.guest.agent``. It starts the embedded Deephaven server in this very process,
so cells run in Deephaven's own script scope (tables a cell makes are visible in the web IDE too),
``print`` output is captured per cell and streamed while the cell runs, and tables travel back as
Arrow IPC without a round trip through gRPC.

Transports: a unix socket (local backend), a virtio-serial port (QEMU; one host at a time) or an
AF_VSOCK listener (Firecracker). Every request is looked up in one table, ``Agent.handlers``, which
says where it runs and which handler answers it; a handler returns the fields of its ``done`` reply
(or raises), and ``Agent._answer`` sends that reply, or the error, once for all of them.

Threads: the main thread executes exec, tables and fetch one at a time (so a cancel can interrupt
a cell with SIGINT, which also wakes blocking calls like ``time.sleep``); one reader thread per
connection decodes frames and answers the cheap requests (hello, stats, cancel, restored, clock)
at once; completion and inspection run on question threads of their own; each live view (watch)
has a thread of its own for as long as it lasts.

The parts: ``cells`` (running one cell), ``introspect`` (Tab and Shift-Tab), ``reseed`` (the host's
clock, entropy and key after a restore), ``server`` (the Deephaven server and Arrow), ``rich``
(display output), ``live`` (live views of ticking tables).
"""

from __future__ import annotations

import argparse
import builtins
import contextlib
import os
import queue
import resource
import signal
import socket
import sys
import tempfile
import threading
import time
import types
from pathlib import Path
from typing import Callable, NamedTuple

from .. import protocol as P
from . import introspect, live, rich
from .cells import CellRunner
from .common import HostLink, Replies, log, safe_send
from .reseed import Clock, after_restore, reseed_java
from .server import Deephaven

AGENT_VERSION = "0.2.0"
# Threads answering completions and inspections (more only while earlier ones are stuck).
MAX_QUESTION_THREADS = 4
# Live views at once (each is a thread and a Deephaven listener while it lasts).
MAX_WATCHES = 32
# Where a request runs (see the module docstring).
INLINE, MAIN, QUESTION, STREAM = "inline", "main", "question", "stream"


class Request(NamedTuple):
    """One request frame and where its replies go (the host that sent it, on its connection)."""

    conn: Replies
    header: dict
    payloads: list

    @property
    def link(self) -> HostLink:
        return self.conn.link

    @property
    def rid(self):
        """The request id, which every event answering it carries as ``re``."""
        return self.header.get("id")


class UnknownOperation(Exception):
    """A request whose op this agent does not know: answered with an error, never a crash."""


class Agent:
    """Executes requests from connected hosts against one Deephaven script scope."""

    def __init__(self, workdir: Path, dh: Deephaven, namespace: dict, clock: Clock | None = None):
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
        self.running: tuple[HostLink, int, object] | None = None  # (link, host, request id) of the running exec
        self.running_lock = threading.Lock()
        self.cells = CellRunner(workdir, dh, namespace, self._running)
        # (link id, host, request id) -> (kind, stop event) of each request that streams until stopped:
        # live views ("watch") and streamed fetches ("fetch"). A cancel sets the event.
        self.streams: dict[tuple[int, int, object], tuple[str, threading.Event]] = {}
        self.started = time.time()
        # op -> (where it runs, handler). A handler returns its done reply's fields (None: a notice,
        # no reply) or raises; "status" in the fields overrides "ok".
        self.handlers: dict[str, tuple[str, Callable[[Request], dict | None]]] = {
            P.OP_HELLO: (INLINE, self.hello),
            P.OP_CANCEL: (INLINE, self.cancel),
            P.OP_STATS: (INLINE, self.stats),
            P.OP_RESTORED: (INLINE, self.restored),
            P.OP_HOLD: (INLINE, self.hold),
            P.OP_RESUME: (INLINE, self.resume),
            P.OP_CLOCK: (INLINE, self.clock_notice),
            P.OP_WEB: (INLINE, self.web_settings),
            P.OP_COMPLETE: (QUESTION, self.complete),
            P.OP_INSPECT: (QUESTION, self.inspect),
            P.OP_EXEC: (MAIN, self.execute),
            P.OP_TABLES: (MAIN, self.tables),
            P.OP_FETCH: (MAIN, self.fetch),
            P.OP_WATCH: (STREAM, self.watch),
        }

    # -- connections -------------------------------------------------------------------------

    def serve(self, listener: socket.socket | None) -> None:
        """Run requests on the main thread forever; connections are accepted on ``listener``."""
        if listener is not None:
            threading.Thread(target=self._accept_loop, args=(listener,), name="dhg-accept", daemon=True).start()
        while True:
            try:
                self._answer(*self.jobs.get())
            except KeyboardInterrupt:
                pass  # a cancel that arrived just after its cell ended

    def serve_serial(self, device: str) -> None:
        """Serve one host at a time over a virtio-serial port (the QEMU backend)."""
        threading.Thread(target=self._serial_loop, args=(device,), name="dhg-serial", daemon=True).start()
        self.serve(None)

    def _serial_loop(self, device: str) -> None:
        while True:
            # A read of 0 bytes means the host side is not connected: reopen and wait for the next host.
            self._read_loop(HostLink(P.FrameStream(P.FdChannel(os.open(device, os.O_RDWR)))))
            time.sleep(0.02)

    def _accept_loop(self, listener: socket.socket) -> None:
        while True:
            sock, _ = listener.accept()
            threading.Thread(target=self._read_loop, args=(HostLink(P.FrameStream(sock)),), name="dhg-conn",
                             daemon=True).start()

    def _read_loop(self, link: HostLink) -> None:
        link.reader = threading.current_thread()
        while True:
            try:
                frame = link.recv()
            except P.ConnectionClosed:
                break
            except P.ProtocolError as e:
                safe_send(link.replies(), P.error_event("ProtocolError", str(e)))
                if e.recoverable:
                    continue
                break
            except OSError:
                break
            if frame.header.get("op") == P.OP_RESTORED:
                # A new host (this VM was restored from a snapshot): what the old one asked goes unanswered.
                link.release(new_host=True)
            self._dispatch(Request(link.replies(), frame.header, frame.payloads))
        self._cancel_if_running(link, None, None)
        self._stop_streams(link, None, None)
        link.release()  # senders held by a checkpoint (Firecracker resets connections) fail and end
        link.close()

    # -- dispatch ----------------------------------------------------------------------------

    def _dispatch(self, req: Request) -> None:
        """Answer ``req`` here (the cheap ones), or queue it for the main thread or a question thread."""
        if req.header.get("now_ns") is not None:
            self.clock.observe(req.header["now_ns"])
        where, handler = self.handlers.get(req.header.get("op"), (INLINE, self.unknown))
        if where == MAIN:
            self.jobs.put((req, handler))
        elif where == QUESTION:
            self._ask(req, handler)
        elif where == STREAM:
            threading.Thread(target=self._answer, args=(req, handler), name="dhg-watch", daemon=True).start()
        else:
            self._answer(req, handler)

    def _answer(self, req: Request, handler: Callable[[Request], dict | None]) -> None:
        """Run ``handler`` and send its done reply; a failure is an error event, then done with status error."""
        try:
            reply = handler(req)
        except BaseException as e:  # noqa: BLE001 - every failure goes back to the host (a cancel too)
            safe_send(req.conn, P.error_event(type(e).__name__, str(e), re=req.rid))
            reply = {"status": "error"}
        if reply is not None:
            safe_send(req.conn, {"ev": P.EV_DONE, "re": req.rid, "status": "ok", **reply})

    def _ask(self, req: Request, handler) -> None:
        """Queue a question, starting a thread for it when none is idle (up to MAX_QUESTION_THREADS)."""
        with self._question_lock:
            if self._idle_question_threads == 0 and self._question_threads < MAX_QUESTION_THREADS:
                self._question_threads += 1
                threading.Thread(target=self._answer_loop, name="dhg-introspect", daemon=True).start()
        self.questions.put((req, handler, time.monotonic()))

    def _answer_loop(self) -> None:
        while True:
            with self._question_lock:
                self._idle_question_threads += 1
            req, handler, asked = self.questions.get()
            with self._question_lock:
                self._idle_question_threads -= 1
            if time.monotonic() - asked > float(req.header.get("deadline_s") or 30):
                continue  # the host has given up on this one: do not spend time on it
            self._answer(req, handler)

    @contextlib.contextmanager
    def _running(self, conn: Replies, rid):
        """While the body runs (a cell's code), a cancel from the same host interrupts the main thread."""
        with self.running_lock:
            self.running = (conn.link, conn.host, rid)
        try:
            yield
        finally:
            with self.running_lock:
                self.running = None

    def _stop_streams(self, link: HostLink, host: int | None, target) -> bool:
        """Stop the streaming requests on ``link`` (of one host or all; all, or the one with request id ``target``)."""
        with self.running_lock:
            stops = [ev for (c, h, rid), (_, ev) in self.streams.items()
                     if c == id(link) and host in (None, h) and target in (None, rid)]
        for ev in stops:
            ev.set()
        return bool(stops)

    @contextlib.contextmanager
    def _stoppable(self, req: Request, kind: str, limit: int | None = None):
        """A stop event for a streaming request, set by a cancel of it or the end of its connection."""
        key, stop = (id(req.link), req.conn.host, req.rid), threading.Event()
        with self.running_lock:
            if limit is not None and sum(k == kind for k, _ in self.streams.values()) >= limit:
                raise RuntimeError(f"already {limit} live views in this session; stop some first")
            self.streams[key] = (kind, stop)
        try:
            yield stop
        finally:
            with self.running_lock:
                self.streams.pop(key, None)

    def _cancel_if_running(self, link: HostLink, host: int | None, target) -> bool:
        with self.running_lock:
            running = self.running
            if running and running[0] is link and host in (None, running[1]) and target in (None, running[2]):
                signal.pthread_kill(self.main_thread, signal.SIGINT)
                return True
        return False

    # -- requests ----------------------------------------------------------------------------

    def hello(self, req: Request) -> dict:
        version = req.header.get("version")
        if version != P.PROTOCOL_VERSION:
            safe_send(req.conn, P.error_event(
                "VersionMismatch", f"host speaks protocol {version}, agent speaks {P.PROTOCOL_VERSION}",
                re=req.rid))
        return {"version": P.PROTOCOL_VERSION, "agent_version": AGENT_VERSION,
                "deephaven_version": self.dh.version, "python": sys.version.split()[0],
                "server": {"host": self.dh.host, "port": self.dh.port, "auth": "psk",
                           "key_set": self.dh.has_key},
                "workdir": str(self.workdir), "tmpdir": tempfile.gettempdir(), "pid": os.getpid(),
                "startup_ms": round(self.dh.started_ms, 1)}

    def cancel(self, req: Request) -> dict:
        target = req.header.get("target")
        stopped = target is not None and self._stop_streams(req.link, req.conn.host, target)
        return {"cancelled": self._cancel_if_running(req.link, req.conn.host, target) or stopped}

    def stats(self, req: Request) -> dict:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        out = {"cells": self.cells.count, "uptime_s": round(time.time() - self.started, 1),
               "max_rss_bytes": usage.ru_maxrss * 1024, "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
               "tables": sum(1 for v in list(self.ns.values()) if self.dh.is_table(v)),
               "live_views": sum(kind == "watch" for kind, _ in list(self.streams.values())),
               **self.clock.describe()}
        try:
            out.update(self.dh.jvm_memory())
        except Exception:
            pass
        return out

    def restored(self, req: Request) -> dict:
        # The requests of the host this VM was saved with (live views of a checkpointed session) end here.
        with self.running_lock:
            old = [ev for (c, h, _), (_, ev) in self.streams.items() if c == id(req.link) and h != req.conn.host]
        for ev in old:
            ev.set()
        info = after_restore(req.header, req.payloads, self.dh, self.clock)
        # A clone's life starts now (read after the clock was set): the snapshot's warm-up cells
        # and uptime are not its own.
        self.cells.count, self.started = 0, time.time()
        return info

    def hold(self, req: Request) -> None:
        """Before a checkpoint: answer once nothing is half sent, then send nothing until resume or restored."""
        req.link.hold({"ev": P.EV_DONE, "re": req.rid, "status": "ok", "tables": self._table_names()})
        return None

    def resume(self, req: Request) -> dict:
        """After a checkpoint, in the VM it was taken of: carry on."""
        req.link.release()
        return {}

    def clock_notice(self, req: Request) -> None:
        """The host's clock (``now_ns``, observed in _dispatch for every request): no reply."""
        return None

    def web_settings(self, req: Request) -> dict:
        """Settings of Deephaven's web UI: ``time_zone``, the zone it shows times in."""
        return {"time_zone": self.dh.set_web_time_zone(str(req.header.get("time_zone")))}

    def complete(self, req: Request) -> dict:
        h = req.header
        return introspect.complete(self.ns, self.dh.is_table, h.get("code", ""), int(h.get("cursor_pos", 0)))

    def inspect(self, req: Request) -> dict:
        h = req.header
        return introspect.inspect(self.ns, self.dh.is_table, h.get("code", ""), int(h.get("cursor_pos", 0)),
                                  int(h.get("detail_level", 0)))

    def execute(self, req: Request) -> dict:
        return self.cells.run(req.conn, req.header, req.payloads)

    def _table_names(self) -> list[str]:
        return [n for n, v in list(self.ns.items()) if not n.startswith("_") and self.dh.is_table(v)]

    def tables(self, req: Request) -> dict:
        return {"tables": [{"name": n, **self.dh.describe(v)} for n, v in list(self.ns.items())
                           if not n.startswith("_") and self.dh.is_table(v)]}

    def fetch(self, req: Request) -> dict:
        name = req.header.get("name", "")
        table = self.ns.get(name)
        if not self.dh.is_table(table):
            raise KeyError(f"no Deephaven table named {name!r} in the session")
        if req.header.get("stream"):
            # The whole table, batch by batch; a cancel (the host's Ctrl-C) stops it between batches.
            with self._stoppable(req, "fetch") as stop:
                return self.dh.stream_table(name, table, lambda h, p: req.conn.send({**h, "re": req.rid}, p), stop)
        head, ipc = self.dh.table_payload(name, table, req.header.get("max_rows"))
        safe_send(req.conn, {**head, "re": req.rid}, [ipc])
        return {}

    def watch(self, req: Request) -> dict:
        """A live view of a table: ``live`` events until cancelled or the table is released or rebound."""
        with self._stoppable(req, "watch", MAX_WATCHES) as stop:
            view = live.Watch(self.dh, self.ns, req.header, stop)
            with self.dh.context():
                return view.run(lambda h, p: req.conn.send({**h, "re": req.rid}, p))

    def unknown(self, req: Request) -> dict:
        raise UnknownOperation(f"unknown op {req.header.get('op')!r}")


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
            log(f"owner process {pid} is gone; exiting")
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
    # As in a notebook, the workspace comes first on sys.path, so a pushed helper.py imports; it replaces
    # the directory `python -m` started in (the instance dir, or / in a VM).
    sys.path[0] = str(workdir.resolve())
    ns = _fresh_main()
    # The login key of a local agent comes in the environment (never argv); a VM's comes after each restore.
    key = os.environ.pop("DHG_KEY", None)
    dh = Deephaven(args.dh_host, args.dh_port, args.heap, Path(args.classes))
    log(f"starting Deephaven on {dh.host}:{dh.port}")
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
    introspect.warm(ns, dh.is_table)
    where = args.socket or args.serial or f"vsock port {args.vsock_port}"
    log(f"Deephaven {dh.version} ready in {dh.started_ms:.0f} ms; serving on {where}")
    if args.serial:
        agent.serve_serial(args.serial)
    elif args.vsock_port is not None:
        agent.serve(listen_vsock(args.vsock_port))
    else:
        agent.serve(listen_unix(args.socket))


if __name__ == "__main__":
    main()
