"""A session: which server (a VM or a local process) a notebook's cells run on, and its lifecycle.

Per-session mode starts one server lazily (on the first cell) and reuses it; per-cell mode takes a
fresh one from a warm pool for every cell. A server found dead is replaced, and the replacement told
in the next cell. Every request to a server is ``server.py``'s; what a session does with checkpoints
is ``checkpoint.py``'s; its web links are ``weblinks.py``'s.
"""

from __future__ import annotations

import os
import threading
import time
from typing import TYPE_CHECKING, Callable, Sequence

from . import checkpoint as cp
from . import status as report
from . import weblinks
from .config import DEFAULT_BACKEND, DEFAULT_DTYPE_BACKEND, DEFAULT_MAX_ROWS, Layout
from .errors import AgentDied, AgentUnresponsive, AnswerAbandoned, DhvmError, UsageError
from .files import CellInput, PushFile, Pushed
from .instances import reap_stale
from .live import DEFAULT_LIVE_RATE, DEFAULT_LIVE_ROWS, LiveFeed, LiveUpdate, LiveViews
from .pool import WarmPool
from .result import CellResult, DisplayOutput, Stream, TableResult
from .server import Server, start_server
from .vm import Backend, Instance, check_options, choose_backend, get_backend, memory
from .exits import install_exit_hooks, stop_all_sessions, track

if TYPE_CHECKING:
    from .tablefiles import WrittenFile

__all__ = ["Session", "DhvmError", "AgentDied", "AgentUnresponsive", "AnswerAbandoned", "Server", "start_server",
           "stop_all_sessions"]

MODES = ("per-session", "per-cell")


class Session:
    """Cells run on one server reused across cells (``per-session``) or on a fresh one each
    (``per-cell``, served from a warm pool so the restore is not paid in front of the user)."""

    def __init__(self, backend: str = DEFAULT_BACKEND, config_dir: str | os.PathLike | None = None,
                 mode: str = "per-session", pool_size: int = 1, **backend_options):
        if mode not in MODES:
            raise UsageError(f"unknown mode {mode!r}; choose per-session or per-cell")
        check_options(backend_options)  # a misspelt option would vanish: backends ignore each other's
        self.layout = Layout.resolve(config_dir)
        self.backend_name = backend
        self.backend_options = backend_options
        self.mode = mode
        self.pool_size = pool_size
        self._backend: Backend | None = None
        self._pool: WarmPool | None = None
        self.server: Server | None = None
        """The session's own server (per-session mode), once started."""
        self.passed_over: dict[str, str] = {}
        """With backend ``auto``: the backends not chosen, and why."""
        self.notice: str | None = None
        """A one-time warning for the user (e.g. auto fell back to the unisolated local backend)."""
        self._announcements: list[str] = []
        """Server replacements the user has not been told about yet: said in the next cell that runs."""
        self._views = LiveViews()
        """Live views of tables in the session's server (they end with it)."""
        self._lock = threading.RLock()
        self.memory_headroom_mb: int | None = None
        """Memory a start needs beyond its snapshot's size (None: ``memory.DEFAULT_HEADROOM_MB``)."""
        self.ended: str | None = None
        """Why the session's last server died, once it is found dead (``%dhvm sessions`` says it)."""
        track(self)  # stopped at exit and on SIGTERM
        install_exit_hooks()

    # -- lifecycle ---------------------------------------------------------------------------------

    @property
    def backend(self) -> Backend:
        if self._backend is None:
            if self.backend_name == "auto":
                chosen, self.passed_over = choose_backend(self.layout)
                if chosen == "local":
                    self.notice = ("dhvm: no microVM backend is available, so cells run in a local process "
                                   "WITHOUT isolation (" + "; ".join(f"{k}: {v}" for k, v in self.passed_over.items())
                                   + ")")
                self.backend_name = chosen
            self._backend = get_backend(self.backend_name, self.layout, **self.backend_options)
        return self._backend

    @property
    def instance(self) -> Instance | None:
        return self.server.instance if self.server else None

    @property
    def info(self) -> dict:
        return self.server.info if self.server else {}

    @property
    def pushed(self) -> dict[str, Pushed]:
        return self.server.pushed if self.server else {}

    @property
    def running(self) -> bool:
        return self.server is not None

    def _launch(self, checkpoint: str | None = None) -> Server:
        reap_stale(self.layout)
        srv = start_server(self.backend, checkpoint, headroom_mb=self.memory_headroom_mb)
        srv.on_lost = self._lost
        return srv

    def adopt(self, srv: Server) -> None:
        """Make ``srv`` (started elsewhere: a fork) the session's server."""
        srv.on_lost = self._lost
        self.server = srv

    def sibling(self) -> "Session":
        """A new session of the same backend and settings (no server yet)."""
        child = Session(self.backend_name, self.layout.home, mode="per-session",
                        **{**self.backend_options, "start_from": self.start_from})
        child.memory_headroom_mb = self.memory_headroom_mb
        return child

    @property
    def pool(self) -> WarmPool:
        if self._pool is None:
            self._pool = WarmPool(self._launch, self.pool_size)
        return self._pool

    def warm(self) -> None:
        """Get ready for the next cell in the background-friendly way the mode needs."""
        if self.mode == "per-cell":
            self.pool.fill()
        else:
            self.start()

    def set_mode(self, mode: str) -> None:
        """Switch mode; the resources of the old mode (its server, or its warm pool) are released."""
        if mode not in MODES:
            raise UsageError(f"unknown mode {mode!r}; choose per-session or per-cell")
        with self._lock:
            if mode == self.mode:
                return
            self.mode = mode
            if mode == "per-cell" and self.server is not None:
                self.stop_live(reason="the session switched to per-cell mode")
                self.server.close()
                self.server = None
            if mode == "per-session" and self._pool is not None:
                self._pool.close()
                self._pool = None

    def set_pool_size(self, size: int) -> None:
        self.pool_size = size
        if self._pool is not None:
            self._pool.size = max(0, size)
            self._pool.fill()

    def start(self) -> dict:
        """Start the session's server (if not running) and greet its agent; returns the agent's hello."""
        with self._lock:
            if self.server is None:
                self.server = self._launch()
            return self.server.info

    def stop(self, reason: str = "the session was stopped") -> None:
        """Destroy the session's server and the warm pool (idempotent); live views end first."""
        with self._lock:
            self.stop_live(reason=reason)
            if self.server is not None:
                self.server.close()
                self.server = None
            if self._pool is not None:
                self._pool.close()
                self._pool = None

    def reset(self) -> None:
        """Throw the server away; the next cell gets a fresh one."""
        self.stop(reason="the session was reset")

    def _lost(self, srv: Server, announce: str | None = None, why: str | None = None) -> str:
        """Tear down a dead or stuck server (``Server.lost``); returns its log tail for the error message.
        ``announce``: what to tell the user in the next cell (when no cell's error says it already);
        ``why``: what ``%dhvm sessions`` says ended it."""
        tail = srv.instance.log_tail()
        srv.close()
        if srv is self.server:
            self.server = None
            self.ended = why or announce
            if announce:
                self._announcements.append(announce)
        return tail

    def _bury(self, srv: Server) -> None:
        """Reap the session's server found dead between requests; why it died goes to ``ended`` and the next cell."""
        cause = None if srv.client.death else memory.death_cause(srv.instance)  # before _lost's own kill
        why = cause.told() if cause else srv.client.dead or "its process exited"
        self._lost(srv, f"the session's VM was lost since the last cell ({why}); "
                        f"this cell runs in a fresh VM, and variables and tables of earlier cells are gone", why)

    def take_announcements(self) -> list[str]:
        """The replacements not yet told (and forget them): for ``dhvm exec`` and the magic."""
        with self._lock:
            out, self._announcements = self._announcements, []
        return out

    def _own_server(self, refused: str | None = None) -> Server:
        """The session's server for the next request, started if needed; one whose agent died while idle
        is replaced first. ``refused``: what per-cell mode cannot do (it keeps no server). Lock held."""
        if refused and self.mode == "per-cell":
            raise self._per_cell_note(refused)
        self.start()
        assert self.server is not None
        if self.server.client.dead is not None:
            self._bury(self.server)
            self.start()
        assert self.server is not None
        return self.server

    @staticmethod
    def _per_cell_note(what: str) -> DhvmError:
        return UsageError(f"{what}: in per-cell mode no server outlives its cell, so there is nothing to ask. "
                          f"Use -o NAME on the cell, or switch: %config Dhvm.mode = 'per-session'")

    # -- checkpoints (checkpoint.py) -------------------------------------------------------------------

    @property
    def start_from(self) -> str | None:
        """The checkpoint every new server of this session starts from (None: the base snapshot)."""
        return self.backend_options.get("start_from") or None

    def check_start_from(self, name: str) -> None:
        """Refuse (saying why and what to do) a checkpoint this session's servers could not start from."""
        cp.check_start_from(self, name)

    def set_start_from(self, name: str | None) -> None:
        """Start every new server (and warm-pool VM) from checkpoint ``name`` (None: the base snapshot)."""
        cp.set_start_from(self, name)

    def checkpoint(self, name: str, overwrite: bool = False, temporary: bool = False):
        """Save the session's server as checkpoint ``name``; it runs on. Returns the Checkpoint."""
        return cp.save_session(self, name, overwrite, temporary)

    def restore(self, name: str) -> dict:
        """Replace the session's server with one restored from checkpoint ``name``."""
        return cp.restore_session(self, name)

    def fork(self, origin: str | None = None) -> "Session":
        """A new session whose server starts from this one's state now."""
        return cp.fork_session(self, origin)

    # -- cells -------------------------------------------------------------------------------------

    def execute(self, code: str, files: Sequence[PushFile] = (), *, max_rows: int | None = DEFAULT_MAX_ROWS,
                timeout: float | None = None, dtype_backend: str = DEFAULT_DTYPE_BACKEND,
                on_stdout: Stream | None = None, on_stderr: Stream | None = None,
                full_tables: Sequence[str] = (), mode: str | None = None,
                on_display: Callable[[DisplayOutput], None] | None = None,
                inputs: Sequence[CellInput] = (), execution_count: int | None = None) -> CellResult:
        """Run one cell; output is streamed to the callbacks as it arrives.

        ``execution_count``: the notebook's prompt number, which names the cell in VM tracebacks.
        ``inputs`` (``-i``) are bound in the VM before the cell runs: tables as Deephaven tables.
        ``full_tables`` are fetched whole (for ``-o``) from the same server before a per-cell VM goes;
        ``mode`` overrides the session's mode for this cell.
        """
        mode = mode or self.mode
        with self._lock:
            t0 = time.perf_counter()
            srv = self.pool.take() if mode == "per-cell" else self._own_server()
            start_ms = (time.perf_counter() - t0) * 1000
            told = [f"dhvm: {note}\n" for note in self.take_announcements()]
            for line in told:
                if on_stderr:
                    on_stderr(line)
            try:
                result = srv.run_cell(code, files, label=self.backend_name, max_rows=max_rows, timeout=timeout,
                                      dtype_backend=dtype_backend, on_stdout=on_stdout, on_stderr=on_stderr,
                                      on_display=on_display, inputs=inputs, execution_count=execution_count,
                                      bundle=lambda data: weblinks.widget_links(self, data))
                result.stderr = "".join(told) + result.stderr
                if result.error is None:
                    srv.fetch_full(result, full_tables, dtype_backend)
            finally:
                if mode == "per-cell":
                    srv.close()  # results are all in: this VM's job is done
            result.timings = {"start_ms": round(start_ms, 3), **result.timings,
                              "total_ms": round((time.perf_counter() - t0) * 1000, 3)}
            return result

    # -- requests to the session's own server (server.py) -----------------------------------------------

    def tables(self) -> list[dict]:
        """The Deephaven tables in the session's scope: name, rows, columns, refreshing."""
        with self._lock:
            return self._own_server("no tables to list").tables()

    def fetch(self, name: str, max_rows: int | None = DEFAULT_MAX_ROWS,
              dtype_backend: str = DEFAULT_DTYPE_BACKEND) -> TableResult:
        """One table from the session's scope (its first ``max_rows`` rows)."""
        with self._lock:
            return self._own_server(f"cannot fetch {name!r}").fetch(name, max_rows, dtype_backend)

    def fetch_to(self, name: str, path: str | os.PathLike, fmt: str | None = None, force: bool = False,
                 progress: bool | None = None) -> "WrittenFile":
        """The whole table ``name`` streamed into a parquet, CSV or Arrow file (by ``path``'s extension, or
        ``fmt``; see ``Server.fetch_to``); an existing file is refused unless ``force``."""
        from .tablefiles import check_target

        target, fmt = check_target(path, fmt, force)  # before anything is asked of the server
        with self._lock:
            return self._own_server(f"cannot fetch {name!r}").fetch_to(name, target, fmt, force, progress)

    def stats(self) -> dict:
        """Agent statistics (cells run, memory, uptime)."""
        with self._lock:
            return self._own_server().stats()

    def _asked(self) -> Server | None:
        """The server a read-only question goes to: never started, stopped or replaced for one (per-cell
        mode asks a warm VM of the pool); None gives the question's empty answer."""
        srv = self.pool.peek() if self.mode == "per-cell" else self.server
        return srv if srv is not None and srv.client.dead is None else None

    def complete(self, code: str, cursor_pos: int) -> dict:
        """Completions answered by the agent from the live namespace: matches, cursor_start, cursor_end."""
        srv = self._asked()
        return srv.complete(code, cursor_pos) if srv else {"matches": [], "cursor_start": cursor_pos,
                                                            "cursor_end": cursor_pos}

    def inspect(self, code: str, cursor_pos: int, detail_level: int = 0) -> dict:
        """What the agent knows about the name at the cursor: found, data (a MIME bundle)."""
        srv = self._asked()
        return srv.inspect(code, cursor_pos, detail_level) if srv else {"found": False, "data": {}}

    # -- live views ------------------------------------------------------------------------------------

    def watch(self, name: str, on_update: Callable[[LiveUpdate], None], on_end: Callable[[str], None] | None = None,
              *, rows: int = DEFAULT_LIVE_ROWS, head: bool = False, rate: float = DEFAULT_LIVE_RATE,
              dtype_backend: str = DEFAULT_DTYPE_BACKEND) -> LiveFeed:
        """A live view of table ``name``: ``on_update`` gets a snapshot of its last (or first) ``rows``
        rows as it ticks, at most ``rate`` a second, from a thread of the view's own; ``on_end(why)``
        once when it ends (stopped, the table released or rebound, the session stopped or lost)."""
        if self.mode == "per-cell":
            raise self._per_cell_note(f"no live view of {name!r}")
        if rows < 1 or not 0 < rate <= 20:
            raise UsageError(f"a live view needs rows >= 1 (not {rows}) and 0 < rate <= 20 updates/s (not {rate:g})")
        with self._lock:
            srv = self._own_server()
            return self._views.add(srv.watch(name, on_update, on_end, rows=rows, head=head, rate=rate,
                                             dtype_backend=dtype_backend))

    def live_views(self) -> list[LiveFeed]:
        """The live views still running."""
        return self._views.running()

    def stop_live(self, name: str | None = None, reason: str = "stopped") -> int:
        """End the live views (of table ``name``, or all); returns how many were running."""
        return self._views.stop(name, reason)

    # -- what it is (web links: weblinks.py) --------------------------------------------------------------

    @property
    def client(self):
        return self.server.client if self.server else None

    def deephaven_address(self) -> tuple[str, int] | None:
        """Where the host reaches the session's Deephaven server (127.0.0.1 and a port), if running."""
        return weblinks.deephaven_address(self)

    def ide_url(self, name: str | None = None) -> str:
        """A one-time link to the server's web UI (the console, or the table or figure ``name`` holds)."""
        return weblinks.ide_url(self, name)

    def pydeephaven_session(self, **kwargs):
        """A pydeephaven Session on the session's server, logged in with this instance's key."""
        return weblinks.pydeephaven_session(self, **kwargs)

    def summary(self) -> dict:
        """One line of ``%dhvm sessions`` (``status.py``)."""
        return report.summary(self)

    def status(self) -> dict:
        """What ``%dhvm status`` shows, without starting anything (``status.py``)."""
        return report.status(self)
