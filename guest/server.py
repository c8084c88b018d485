"""The embedded Deephaven server, and conversions of its tables to what the host is sent.

(Not named ``deephaven.py``: that would read like, and could shadow, Deephaven's own package.)
"""

from __future__ import annotations

import signal
import socket
import tempfile
import time
from pathlib import Path

from .. import protocol as P

_ARROW_EOS = b"\xff\xff\xff\xff\x00\x00\x00\x00"
# Must match dhg_kernel.guest_java (a test checks): the image carries dhg_kernel.protocol, not guest_java.
AUTH_HANDLER = "dhg.TokenAuthHandler"
PSK_TYPE = "io.deephaven.authentication.psk.PskAuthenticationHandler"
# Rows of a streamed table converted to Arrow at a time (see stream_table).
STREAM_SLICE_ROWS = 262_144
JVM_OPENS = ("java.base/java.lang", "java.base/java.util", "java.base/java.util.concurrent")


class Deephaven:
    """The embedded Deephaven server and conversions of its tables."""

    def __init__(self, host: str, port: int, heap: str, classes: Path):
        self.host = host
        self.port = port or _free_port(host)
        self.heap = heap
        self.classes = classes
        self.version = "?"
        self.started_ms = 0.0
        self._exec_ctx = None

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
        # -XX:+DisableAttachMechanism: with -Xrs the JVM opens its attach socket (/tmp/.java_pid<pid>, always
        # /tmp) at start-up, and a killed agent leaves it behind; nothing of ours attaches to the JVM.
        jvm = [f"-Xmx{self.heap}", "-Xrs", "-XX:+DisableAttachMechanism", f"-Djava.io.tmpdir={tempfile.gettempdir()}",
               "-XX:-UsePerfData",
               *(f"--add-opens={m}=ALL-UNNAMED" for m in JVM_OPENS)]
        self.server = Server(host=self.host, port=self.port, jvm_args=[*jvm, *auth],
                             extra_classpath=[str(self.classes)])
        self.server.start()
        import jpy

        # Deephaven's web UI offers the login its server names: name the PSK type our handler answers to,
        # so /ide/?psk=KEY logs in.
        jpy.get_type("io.deephaven.configuration.Configuration").getInstance().setProperty("AuthHandlers", PSK_TYPE)
        self.set_web_time_zone(P.DEFAULT_WEB_TIME_ZONE)
        self._auth = jpy.get_type(AUTH_HANDLER)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            from importlib.metadata import version

            self.version = version("deephaven-server")
        except Exception:
            pass
        self.started_ms = (time.perf_counter() - t0) * 1000

    def context(self):
        """The main thread's Deephaven execution context, to enter on another thread (a live view's)
        so table operations there see the same query scope and update graph as cells do."""
        if self._exec_ctx is None:
            raise RuntimeError("the Deephaven execution context was not captured (warm_up not run)")
        return self._exec_ctx

    def set_key(self, key: str | None) -> None:
        """The key logins must present from now on (None: refuse all)."""
        self._auth.setKey(key or None)

    def set_web_time_zone(self, zone: str) -> str:
        """The time zone Deephaven's web UI shows times in: its ``timeZone`` setting, which the web UI
        reads from the server's client configuration on every page load. An unknown zone raises."""
        import jpy

        jpy.get_type("java.time.ZoneId").of(zone)  # raises for a name Java does not know
        conf = jpy.get_type("io.deephaven.configuration.Configuration").getInstance()
        names = [n for n in conf.getStringWithDefault("client.configuration.list", "").split(",") if n]
        if "timeZone" not in names:
            conf.setProperty("client.configuration.list", ",".join([*names, "timeZone"]))
        conf.setProperty("timeZone", zone)
        return zone

    @property
    def has_key(self) -> bool:
        return bool(self._auth.hasKey())

    def warm_up(self) -> None:
        """Run a small query so the common code paths are loaded before the first cell (and snapshot)."""
        from deephaven import empty_table
        from deephaven.execution_context import get_exec_ctx

        self._exec_ctx = get_exec_ctx()  # on the main thread, where cells run
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

    @staticmethod
    def describe_columns(table) -> dict:
        return {"columns": [{"name": c.name, "type": str(c.data_type)} for c in table.columns]}

    def describe(self, table) -> dict:
        return {"rows": int(table.size), **self.describe_columns(table), "refreshing": bool(table.is_refreshing)}

    def stream_table(self, name: str, table, send, stop) -> dict:
        """The whole table, a record batch per ``batch`` event after a ``table`` event with its schema;
        returns the done reply's fields (rows and batches sent). A ticking table is snapshotted first.

        Deephaven's converter builds all its batches at its first ``next()``, so the table goes
        ``STREAM_SLICE_ROWS`` rows at a time: only one slice is ever held as Arrow, the first batch
        leaves at once, and ``stop`` (a cancel) is looked at between batches, never in the middle of
        a send (a SIGINT there would cut a frame in half)."""
        from deephaven.arrow import _JTableToArrowConverter

        snapshot_ns = None
        if table.is_refreshing:
            table = table.snapshot()
            snapshot_ns = time.time_ns()
        total = int(table.size)
        batches = 0
        for start in range(0, max(total, 1), STREAM_SLICE_ROWS):
            part = table if total <= STREAM_SLICE_ROWS else table.slice(start, min(start + STREAM_SLICE_ROWS, total))
            conv = _JTableToArrowConverter(part.j_table)
            if start == 0:
                send({"ev": P.EV_TABLE, "name": name, "stream": True, **self.describe(table), "rows": total,
                      "refreshing": snapshot_ns is not None, **({"snapshot_ns": snapshot_ns} if snapshot_ns else {})},
                     [memoryview(conv.getSchema()).cast("B")])
            while conv.hasNext():
                if stop.is_set():
                    raise KeyboardInterrupt(f"fetch of {name!r} cancelled after {batches} batches")
                send({"ev": P.EV_BATCH, "seq": batches}, [memoryview(conv.next()).cast("B")])
                batches += 1
        return {"rows": total, "batches": batches}

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
