"""A small QMP (QEMU Machine Protocol) client: JSON commands and events over a unix socket.

QMP is QEMU's machine-readable control channel. On connect QEMU sends a greeting; the client
must send ``qmp_capabilities`` before any other command. Every command gets exactly one reply
(``return`` or ``error``); asynchronous ``event`` messages may arrive at any time in between,
so they are queued here and read with ``events()`` / ``wait_event()``.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections import deque
from pathlib import Path
from typing import Any


class QMPError(Exception):
    """QEMU answered a command with an error (``class`` and ``desc`` from the reply)."""

    def __init__(self, command: str, error: dict):
        self.command = command
        self.error_class = error.get("class", "GenericError")
        self.desc = error.get("desc", "")
        super().__init__(f"QMP {command} failed: {self.error_class}: {self.desc}")


class QMPClosed(EOFError):
    """The QMP socket closed (QEMU exited or dropped the monitor)."""


class QMPClient:
    """One QMP connection. Not thread-safe: use from one thread (or guard with a lock)."""

    def __init__(self, sock: socket.socket):
        self._sock = sock
        self._buf = bytearray()
        self._events: deque[dict] = deque()
        self.greeting: dict = {}

    # -- connecting --------------------------------------------------------------------------------

    @classmethod
    def connect(cls, path: str | os.PathLike, timeout: float = 10.0, is_alive=lambda: True) -> "QMPClient":
        """Connect to QEMU's QMP socket (retrying while QEMU creates it) and negotiate capabilities."""
        deadline = time.monotonic() + timeout
        path = Path(path)
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            dfd = None
            try:
                target = str(path)
                if len(target) > 100:  # sun_path is 108 bytes; go through the directory's fd
                    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
                    target = f"/proc/self/fd/{dfd}/{path.name}"
                sock.connect(target)
                break
            except (FileNotFoundError, ConnectionRefusedError) as e:
                sock.close()
                if not is_alive():
                    raise QMPClosed(f"QEMU exited before its QMP socket {path} was ready") from e
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"QMP socket {path} not ready within {timeout:g}s") from e
                time.sleep(0.02)
            finally:
                if dfd is not None:
                    os.close(dfd)
        client = cls(sock)
        sock.settimeout(max(0.1, deadline - time.monotonic()))
        client.greeting = client._read()
        if "QMP" not in client.greeting:
            raise QMPError("greeting", {"desc": f"unexpected greeting {client.greeting!r}"})
        client.execute("qmp_capabilities")
        sock.settimeout(None)
        return client

    def close(self) -> None:
        """Close the connection (QEMU keeps running)."""
        try:
            self._sock.close()
        except OSError:
            pass

    def __enter__(self) -> "QMPClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- wire --------------------------------------------------------------------------------------

    def _read(self) -> dict:
        """The next JSON message (one per line)."""
        while True:
            nl = self._buf.find(b"\n")
            if nl >= 0:
                line = bytes(self._buf[:nl])
                del self._buf[:nl + 1]
                if line.strip():
                    return json.loads(line)
                continue
            chunk = self._sock.recv(65536)
            if not chunk:
                raise QMPClosed("QMP connection closed by QEMU")
            self._buf += chunk

    def _send(self, msg: dict) -> None:
        self._sock.sendall(json.dumps(msg).encode() + b"\n")

    # -- commands and events -----------------------------------------------------------------------

    def execute(self, command: str, arguments: dict[str, Any] | None = None, timeout: float | None = 60.0) -> Any:
        """Run one command and return its ``return`` value; events met on the way are queued."""
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        self._sock.settimeout(timeout)
        try:
            self._send(msg)
            while True:
                reply = self._read()
                if "event" in reply:
                    self._events.append(reply)
                    continue
                if "error" in reply:
                    raise QMPError(command, reply["error"])
                if "return" in reply:
                    return reply["return"]
        finally:
            self._sock.settimeout(None)

    def events(self) -> list[dict]:
        """Queued events (emptying the queue); reads none from the socket."""
        out = list(self._events)
        self._events.clear()
        return out

    def wait_event(self, name: str, timeout: float = 60.0) -> dict:
        """Wait for the next event called ``name`` (other events stay queued)."""
        for i, ev in enumerate(self._events):
            if ev.get("event") == name:
                del self._events[i]
                return ev
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no QMP event {name} within {timeout:g}s")
            self._sock.settimeout(left)
            try:
                ev = self._read()
            except socket.timeout:
                raise TimeoutError(f"no QMP event {name} within {timeout:g}s") from None
            finally:
                self._sock.settimeout(None)
            if ev.get("event") == name:
                return ev
            if "event" in ev:
                self._events.append(ev)

    def status(self) -> str:
        """The VM's run state (``running``, ``paused``, ``inmigrate``, ``postmigrate``…)."""
        return self.execute("query-status")["status"]

    def migrate_wait(self, timeout: float = 600.0, poll: float = 0.05) -> dict:
        """Poll ``query-migrate`` until the migration completes; raise on failure."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.execute("query-migrate")
            st = info.get("status")
            if st == "completed":
                return info
            if st in ("failed", "cancelled"):
                raise QMPError("migrate", {"class": st, "desc": info.get("error-desc", st)})
            if time.monotonic() >= deadline:
                raise TimeoutError(f"migration still {st} after {timeout:g}s")
            time.sleep(poll)
