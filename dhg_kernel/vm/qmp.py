"""QEMU's control channel (QMP) through QEMU's own client library, ``qemu.qmp``.

The library is asyncio-based. Its synchronous shim (``qemu.qmp.legacy``) drives the calling thread's
event loop, which fails inside a Jupyter kernel (whose main thread already runs one) and must not be
shared between a warm pool's thread and the notebook's. So every ``Monitor`` runs its ``QMPClient``
on one private event loop in a daemon thread of its own (``_Loop``), and callers block on the
result, from any thread. Measured here (median of 10): connect + three commands take 4.7 ms this
way against 1.6 ms with the hand-written client it replaced, on a ~330 ms restore.

What this adds to the library: connecting while QEMU is still creating the socket (and through
paths over the 108-byte limit: ``base.connect_unix``), waiting for a migration to finish, and errors
that say which command failed under our error root.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, Coroutine

from qemu.qmp import QMPClient
from qemu.qmp import QMPError as _LibraryError

from ..errors import AgentStartError, VMMError
from .base import connect_unix


class _Loop:
    """One event loop in a daemon thread, shared by every Monitor of this process."""

    _lock = threading.Lock()
    _loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def run(cls, coro: Coroutine, timeout: float | None) -> Any:
        with cls._lock:
            if cls._loop is None or not cls._loop.is_running():
                loop = asyncio.new_event_loop()
                started = threading.Event()
                loop.call_soon(started.set)
                threading.Thread(target=loop.run_forever, name="dhg-qmp-loop", daemon=True).start()
                started.wait()
                cls._loop = loop
            loop = cls._loop
        future = asyncio.run_coroutine_threadsafe(asyncio.wait_for(coro, timeout), loop)
        return future.result()


class QMPCommandError(VMMError):
    """QEMU answered a QMP command with an error (or the monitor went away)."""

    def __init__(self, command: str, why: str):
        self.command = command
        super().__init__(f"QMP {command} failed: {why}")


class Monitor:
    """One QMP connection, capabilities negotiated; usable from any thread (one call at a time)."""

    def __init__(self, client: QMPClient):
        self._client = client
        self._lock = threading.Lock()
        self.timeout = 60.0
        greeting = client.greeting
        self.greeting: dict = greeting._asdict() if greeting is not None else {}

    @classmethod
    def connect(cls, path: str | os.PathLike, timeout: float = 10.0,
                is_alive: Callable[[], bool] = lambda: True) -> "Monitor":
        """Connect to QEMU's QMP socket, retrying while QEMU creates it, and negotiate capabilities."""
        deadline = time.monotonic() + timeout
        try:
            sock = connect_unix(Path(path), timeout, is_alive, what="QEMU's monitor")
        except AgentStartError as e:
            raise QMPCommandError("connect", str(e)) from None
        client = QMPClient(Path(path).parent.name)
        try:
            _Loop.run(client.connect(sock), max(0.1, deadline - time.monotonic()))
        except (_LibraryError, OSError, asyncio.TimeoutError) as e:
            sock.close()
            raise QMPCommandError("qmp_capabilities", f"{type(e).__name__}: {e}") from None
        return cls(client)

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """Run one command and return its ``return`` value."""
        with self._lock:
            try:
                return _Loop.run(self._client.execute(command, arguments), self.timeout)
            except (_LibraryError, OSError, asyncio.TimeoutError) as e:
                raise QMPCommandError(command, f"{type(e).__name__}: {e}") from None

    def status(self) -> str:
        """The VM's run state (``running``, ``paused``, ``prelaunch``, ``inmigrate``…)."""
        return self.execute("query-status")["status"]

    def migrate_wait(self, timeout: float = 600.0, poll: float = 0.05) -> dict:
        """Poll ``query-migrate`` until the migration completes; QMPCommandError if it fails."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.execute("query-migrate")
            state = info.get("status")
            if state == "completed":
                return info
            if state in ("failed", "cancelled"):
                raise QMPCommandError("migrate", info.get("error-desc", state))
            if time.monotonic() >= deadline:
                raise QMPCommandError("migrate", f"still {state} after {timeout:g}s")
            time.sleep(poll)

    def close(self) -> None:
        """Close the connection (QEMU keeps running)."""
        try:
            _Loop.run(self._client.disconnect(), 5.0)
        except (_LibraryError, OSError, asyncio.TimeoutError, RuntimeError, EOFError):
            # EOFError: QEMU quit (``quit``) and closed the socket before the library's reader saw it go;
            # that surfaced as a bare EOFError at the end of a snapshot save now and then.
            pass

    def __enter__(self) -> "Monitor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
