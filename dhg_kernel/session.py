"""A session: the agents (VMs or local processes) a notebook's cells run on, and the requests sent to them.

This and the guest agent are the only places that give protocol frames meaning. Per-session mode
starts one instance lazily (on the first cell) and reuses it; per-cell mode takes a fresh one from
a warm pool for every cell. The session pushes the files a cell names (skipping ones that agent
already has with the same content), streams output to callbacks, and turns the agent's events
into a ``CellResult``. A dead agent becomes an error in the cell; the next cell starts a new one.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import signal
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Callable, Sequence

from . import protocol as P
from .client import AgentClient
from .config import (CANCEL_GRACE_S, CLUSTER_HOST_ENV, DEFAULT_BACKEND, DEFAULT_DTYPE_BACKEND, DEFAULT_MAX_ROWS, QUESTION_DEADLINE_S,
                     STREAM_CANCEL_GRACE_S, Layout)
from .errors import (AgentDied, AgentRefused, AgentStartError, AgentUnresponsive, AnswerAbandoned, CheckpointError,
                     DhvmError, UsageError)
from .files import CellInput, PushFile
from .instances import reap_stale
from .live import DEFAULT_LIVE_RATE, DEFAULT_LIVE_ROWS, LiveFeed, LiveUpdate
from .pool import WarmPool
from .result import CellEvents, CellResult, DisplayOutput, ExecutionError, Stream, TableResult, table_from_event
from .vm import Backend, Instance, choose_backend, get_backend, memory
from . import weblinks
from .weblinks import PSK_AUTH_TYPE, WEB_VIEWS  # noqa: F401 - where callers found them

__all__ = ["Session", "DhvmError", "AgentDied", "AgentUnresponsive", "AnswerAbandoned", "start_agent", "ReadyAgent"]

# A file whose status changed this close to when it was read may change again within the same clock
# tick without its ctime moving: its status is not trusted, its content is compared (racy-git rule).
RACY_WINDOW_NS = 2_000_000_000


@dataclass
class _Pushed:
    """What an agent has of a workspace file: its content hash, and the file status seen then."""

    stat_key: tuple
    """(size, mtime, ctime, inode, device): ctime moves on every write and cannot be set back by a user,
    unlike mtime (os.utime), so a same-size rewrite with the old mtime is still seen."""
    sha256: str
    trusted: bool
    """False when the file changed just before it was read: then the next cell compares content."""


def _stat_key(st: os.stat_result) -> tuple:
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)


@dataclass
class ReadyAgent:
    """A started instance and a client whose agent answered hello: what a cell runs on."""

    instance: Instance
    client: AgentClient
    info: dict
    """The agent's hello: versions, Deephaven server address, startup time."""
    start_ms: float
    """From asking the backend to the agent's hello (and after-restore reseed)."""
    started: float = field(default_factory=time.time)
    """When it started (wall clock)."""
    checkpoint: str | None = None
    """The checkpoint it was restored from, or "fork of <instance>" (None: the base snapshot, or a local process)."""
    pushed: dict[str, _Pushed] = field(default_factory=dict)
    """Files this agent already has (so an unchanged file is not sent twice)."""

    def close(self) -> None:
        self.client.close()
        self.instance.stop()


def start_agent(backend: Backend, checkpoint: str | None = None, make: Callable[[], Instance] | None = None,
                origin: str | None = None, headroom_mb: int | None = None) -> ReadyAgent:
    """Start (restore) an instance and greet its agent. (Backends that restore snapshots reseed the
    guest's clock and entropy themselves, before handing the instance over.) ``checkpoint``: restore
    that one instead of the backend's usual start; ``make``: how to get the instance instead (a fork),
    and ``origin`` what it started from; ``headroom_mb``: see ``memory.check_room``."""
    t0 = time.perf_counter()
    memory.check_room(backend, checkpoint, headroom_mb)  # NotEnoughMemory: refused before anything starts
    try:
        instance = make() if make else backend.start(checkpoint) if checkpoint else backend.start()
    except OSError as e:  # a run dir that cannot be made, a binary that cannot be run
        raise AgentStartError(f"the {backend.name} backend could not start an instance: {e}. "
                              f"Check DHG_HOME's permissions and free space, then run: dhvm status") from None
    memory.watch(instance)  # so a later death by the host's OOM killer is recognised
    try:
        client = instance.open_client(timeout=30)
        hello = client.hello(timeout=30)
    except BaseException:
        instance.stop()
        raise
    return ReadyAgent(instance, client, hello, (time.perf_counter() - t0) * 1000,
                      checkpoint=origin or checkpoint or backend.start_from)


_live_sessions: "weakref.WeakSet[Session]" = weakref.WeakSet()

MODES = ("per-session", "per-cell")


class Session:
    """Cells run on one agent reused across cells (``per-session``) or on a fresh one each
    (``per-cell``, served from a warm pool so the restore is not paid in front of the user)."""

    def __init__(self, backend: str = DEFAULT_BACKEND, config_dir: str | os.PathLike | None = None,
                 mode: str = "per-session", pool_size: int = 1, **backend_options):
        if mode not in MODES:
            raise UsageError(f"unknown mode {mode!r}; choose per-session or per-cell")
        self.layout = Layout.resolve(config_dir)
        self.backend_name = backend
        self.backend_options = backend_options
        self.mode = mode
        self.pool_size = pool_size
        self._backend: Backend | None = None
        self._pool: WarmPool | None = None
        self.live: ReadyAgent | None = None
        self.passed_over: dict[str, str] = {}
        """With backend ``auto``: the backends not chosen, and why."""
        self.notice: str | None = None
        """A one-time warning for the user (e.g. auto fell back to the unisolated local backend)."""
        self._announcements: list[str] = []
        """VM replacements the user has not been told about yet: said in the next cell that runs."""
        self._feeds: list[LiveFeed] = []
        """Live views of tables in the session's server (they end with it)."""
        self._lock = threading.RLock()
        self.memory_headroom_mb: int | None = None
        """Memory a start needs beyond its snapshot's size (None: ``memory.DEFAULT_HEADROOM_MB``)."""
        self.ended: str | None = None
        """Why the session's last server died, once it is found dead (``%dhvm sessions`` says it)."""
        _live_sessions.add(self)
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
        return self.live.instance if self.live else None

    @property
    def client(self) -> AgentClient | None:
        return self.live.client if self.live else None

    @property
    def info(self) -> dict:
        return self.live.info if self.live else {}

    @property
    def pushed(self) -> dict[str, _Pushed]:
        return self.live.pushed if self.live else {}

    @property
    def running(self) -> bool:
        return self.live is not None

    def _launch(self, checkpoint: str | None = None) -> ReadyAgent:
        reap_stale(self.layout)
        return start_agent(self.backend, checkpoint, headroom_mb=self.memory_headroom_mb)

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
            if mode == "per-cell" and self.live is not None:
                self.stop_live(reason="the session switched to per-cell mode")
                self.live.close()
                self.live = None
            if mode == "per-session" and self._pool is not None:
                self._pool.close()
                self._pool = None

    def set_pool_size(self, size: int) -> None:
        self.pool_size = size
        if self._pool is not None:
            self._pool.size = max(0, size)
            self._pool.fill()

    def start(self) -> dict:
        """Start the session's instance (if not running) and greet its agent; returns the agent's hello."""
        with self._lock:
            if self.live is None:
                self.live = self._launch()
            return self.live.info

    def stop(self, reason: str = "the session was stopped") -> None:
        """Destroy the session's instance and the warm pool (idempotent); live views end first."""
        with self._lock:
            self.stop_live(reason=reason)
            if self.live is not None:
                self.live.close()
                self.live = None
            if self._pool is not None:
                self._pool.close()
                self._pool = None

    def reset(self) -> None:
        """Throw the server away; the next cell gets a fresh one."""
        self.stop(reason="the session was reset")

    # -- checkpoints -----------------------------------------------------------------------------------

    @property
    def snapshot(self) -> str | None:
        """The checkpoint every new server of this session starts from (None: the base snapshot)."""
        return self.backend_options.get("snapshot") or None

    def check_snapshot(self, name: str) -> None:
        """Refuse (saying why and what to do) a checkpoint this session's servers could not start from."""
        from .vm import checkpoint_store as store

        store.check_name(name)
        if not self.backend.can_checkpoint:
            raise CheckpointError(self.backend.no_checkpoints())
        self.backend.snapshot(name)  # a missing or incompatible checkpoint

    def set_snapshot(self, name: str | None) -> None:
        """Start every new server (and warm-pool VM) from checkpoint ``name`` (None: the base snapshot).
        Checked now; the running server is kept until the session is reset."""
        with self._lock:
            if name:
                self.check_snapshot(name)
            self.backend_options["snapshot"] = name or None
            if self._backend is not None:
                self._backend.start_from = name or None
            if self._pool is not None:  # warm VMs of the old snapshot
                self._pool.close()
                self._pool = None

    def _to_copy(self, what: str, then: str) -> ReadyAgent:
        """The running server a checkpoint or fork copies (``what``: "checkpoint" or "fork"); the reasons
        there is none, each with its fix. Call with the lock held."""
        if self.mode == "per-cell":
            raise UsageError(f"in per-cell mode no server outlives its cell, so there is nothing to {what}. "
                             f"Switch: %config Dhvm.mode = 'per-session', run the cells, then {what}")
        if not self.backend.can_checkpoint:
            raise CheckpointError(self.backend.no_checkpoints())
        if self.live is None:
            raise CheckpointError(f"nothing to {what} yet: this session has no server. Run the cells that load "
                                  f"your data, then: {then}")
        return self.live

    def checkpoint(self, name: str, overwrite: bool = False, temporary: bool = False):
        """Save the session's server as checkpoint ``name``; it runs on. Returns the Checkpoint."""
        from . import checkpoint as cp

        with self._lock:
            live = self._to_copy("checkpoint", f"%dhvm checkpoint {name}")
            source = {"instance": live.instance.id, "from_checkpoint": live.checkpoint,
                      "pid": os.getpid()}
            ck = cp.save(self.backend, live.instance, live.client, name, overwrite, source, temporary)
            if live.client.dead is not None and live.instance.alive():
                # Firecracker resets every vsock connection of a VM it snapshots (listeners survive):
                # the server runs on, on a new connection; live views on the old one are over.
                self.stop_live(reason="the checkpoint reset the VM's connections")
                live.client.close()
                live.client = live.instance.open_client(timeout=30)
                live.client.hello(timeout=30)
            return ck

    def restore(self, name: str) -> dict:
        """Replace the session's server with a fresh VM restored from checkpoint ``name`` (once: a later
        reset starts from ``snapshot`` again). The old server is kept if the restore fails."""
        from .vm import checkpoint_store as store

        store.check_name(name)
        with self._lock:
            if self.mode == "per-cell":
                raise UsageError(f"per-cell mode starts every cell fresh: make them start from the checkpoint "
                                 f"with %config Dhvm.snapshot = '{name}'")
            if not self.backend.can_checkpoint:
                raise CheckpointError(self.backend.no_checkpoints())
            new = self._launch(name)
            if self.live is not None:
                self.stop_live(reason=f"the session was restored from checkpoint {name}")
                self.live.close()
            self.live = new
            return new.info

    def fork(self, origin: str | None = None) -> "Session":
        """A new session (same backend and settings) whose server starts from this one's state now;
        ``origin``: what ``summary`` says it started from (default: fork of this session's instance)."""
        import secrets

        from . import checkpoint as cp
        from .vm import checkpoint_store as store

        with self._lock:
            live = self._to_copy("fork", "%dhvm fork NEW")
            child = Session(self.backend_name, self.layout.home, mode="per-session",
                            **{**self.backend_options, "snapshot": self.snapshot})
            child.memory_headroom_mb = self.memory_headroom_mb
            origin = origin or f"fork of {live.instance.id}"
            if self.backend.can_fork:  # a running VM copied into a new one (QEMU)
                child.live = start_agent(child.backend, origin=origin, headroom_mb=self.memory_headroom_mb,
                                         make=lambda: cp.fork(self.backend, live.instance, live.client))
                return child
            name = f"fork-{secrets.token_hex(6)}"
            self.checkpoint(name, temporary=True)
            try:
                child.live = start_agent(child.backend, checkpoint=name, origin=origin,
                                         headroom_mb=self.memory_headroom_mb)
            finally:
                # A running restore holds the memory file open; the name is no longer needed.
                store.remove(self.layout, name)
        return child

    def summary(self) -> dict:
        """One line of ``%dhvm sessions``: running, since when, memory, what it started from."""
        live = self.live
        if live is not None and (live.client.dead is not None or not live.instance.alive()) \
                and self._lock.acquire(timeout=1):
            try:
                if live is self.live:  # found dead: reaped now, told as dead, replaced by the next cell
                    self._bury(live)
            finally:
                self._lock.release()
            live = self.live
        out: dict = {"backend": self.backend_name, "mode": self.mode, "running": self.running,
                     "snapshot": self.snapshot or "base"}
        if live is None and self.ended:
            out["ended"] = self.ended
        if live is not None:
            out["age_s"] = round(time.time() - live.started, 1)
            out["started_from"] = live.checkpoint or "base"
            try:
                stats = self.stats() if live.client.dead is None else {}
            except DhvmError:
                stats = {}
            out["heap_used_mb"] = _mb(stats.get("heap_used"))
            out["tables"] = stats.get("tables")
            out["vm_rss_mb"] = _mb(_process_rss(getattr(live.instance, "proc", None)))
        return out

    @property
    def last_start_ms(self) -> float | None:
        return self.live.start_ms if self.live else None

    # -- cells -------------------------------------------------------------------------------------

    @staticmethod
    def _files_to_send(live: ReadyAgent, files: Sequence[PushFile]) -> tuple[list[dict], list[bytes], dict[str, _Pushed]]:
        metas, datas, record = [], [], {}
        for f in files:
            prev = live.pushed.get(f.rel)
            if prev and prev.trusted and prev.stat_key == _stat_key(f.path.stat()):
                continue  # unchanged: same status, and it had not just changed when it was read
            read_at = time.time_ns()
            with open(f.path, "rb") as fh:
                st = os.fstat(fh.fileno())
                data = fh.read()
            digest = hashlib.sha256(data).hexdigest()
            pushed = _Pushed(_stat_key(st), digest, trusted=st.st_ctime_ns < read_at - RACY_WINDOW_NS)
            record[f.rel] = pushed
            if prev and prev.sha256 == digest:
                continue
            metas.append({"path": f.rel, "size": len(data)})
            datas.append(data)
        return metas, datas, record

    def _lost(self, live: ReadyAgent, announce: str | None = None, why: str | None = None) -> str:
        """Tear down a dead or stuck instance; returns its log tail for the error message.

        ``announce``: what to tell the user in the next cell (when no cell's error says it already);
        ``why``: what ``%dhvm sessions`` says ended it.
        """
        tail = live.instance.log_tail()
        live.close()
        if live is self.live:
            self.live = None
            self.ended = why or announce
            if announce:
                self._announcements.append(announce)
        return tail

    def _bury(self, live: ReadyAgent) -> None:
        """Reap the session's server found dead between requests; why it died goes to ``ended`` and the next cell."""
        cause = None if live.client.death else memory.death_cause(live.instance)  # before _lost's own kill
        why = cause.told() if cause else live.client.dead or "its process exited"
        self._lost(live, f"the session's VM was lost since the last cell ({why}); "
                         f"this cell runs in a fresh VM, and variables and tables of earlier cells are gone", why)

    def take_announcements(self) -> list[str]:
        """The replacements not yet told (and forget them): for ``dhvm exec`` and the magic."""
        with self._lock:
            out, self._announcements = self._announcements, []
        return out

    def _session_live(self) -> ReadyAgent:
        """The session's instance for the next cell; one whose agent died while idle is replaced first."""
        self.start()
        assert self.live is not None
        if self.live.client.dead is not None:
            self._bury(self.live)
            self.start()
        assert self.live is not None
        return self.live

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
            live = self.pool.take() if mode == "per-cell" else self._session_live()
            start_ms = (time.perf_counter() - t0) * 1000
            told = [f"dhvm: {note}\n" for note in self.take_announcements()]
            for line in told:
                if on_stderr:
                    on_stderr(line)
            try:
                result = self._run_cell(live, code, files, max_rows, timeout, dtype_backend, on_stdout, on_stderr,
                                        on_display, inputs, execution_count)
                result.stderr = "".join(told) + result.stderr
                if result.error is None:
                    self._fetch_full(live, result, full_tables, dtype_backend)
            finally:
                if mode == "per-cell":
                    live.close()  # results are all in: this VM's job is done
            result.timings = {"start_ms": round(start_ms, 3), **result.timings,
                              "total_ms": round((time.perf_counter() - t0) * 1000, 3)}
            return result

    def _run_cell(self, live: ReadyAgent, code: str, files: Sequence[PushFile], max_rows: int | None,
                  timeout: float | None, dtype_backend: str, on_stdout: Stream | None,
                  on_stderr: Stream | None, on_display: Callable[[DisplayOutput], None] | None = None,
                  inputs: Sequence[CellInput] = (), execution_count: int | None = None) -> CellResult:
        metas, datas, record = self._files_to_send(live, files)
        result = CellResult(backend=f"{self.backend_name} ({live.instance.id})", files=[m["path"] for m in metas])
        header = {"op": P.OP_EXEC, "code": code, "options": {"max_rows": max_rows}}
        if execution_count is not None:
            header["execution_count"] = execution_count
        if metas:
            header["files"] = metas  # their payloads come first, in order
        if inputs:  # each input's payload follows, named by its index
            header["inputs"] = [{"name": i.name, "kind": i.kind, "payload": len(datas) + n} for n, i in enumerate(inputs)]
            datas.extend(i.payload for i in inputs)
        events = CellEvents(result, dtype_backend, on_stdout, on_stderr, on_display, bundle=self._widget_links)
        t1 = time.perf_counter()
        done: dict = {}
        try:
            done = live.client.request(header, datas, events, timeout=timeout)
        except AgentUnresponsive as e:
            tail = self._lost(live, why=str(e))
            result.status = "cancelled"
            result.error = ExecutionError("KeyboardInterrupt", f"{e}; the {self.backend_name} instance was "
                                          "replaced and its state (tables, variables) is lost. "
                                          "The next cell starts a fresh server.", [tail])
        except AgentDied as e:
            cause = None if e.death else memory.death_cause(live.instance)  # before _lost's own kill
            message = _death_message(e, self.backend_name, cause)
            tail = self._lost(live, why=message)
            result.status = "error"
            result.error = ExecutionError("AgentDied", message, [tail])
        else:
            if "exec_ms" in done.get("timings", {}):
                live.pushed.update(record)  # the files were written (even if the cell then failed)
        events.finish(done)  # without a done (the agent was lost), status and error were set above
        if done and timeout and result.status == "cancelled" and not done.get("interrupted") and result.error:
            result.error.value = f"cell timed out after {timeout:g}s (--timeout) and was cancelled"
        result.timings = {**done.get("timings", {}), "roundtrip_ms": round((time.perf_counter() - t1) * 1000, 3)}
        return result

    def _fetch_full(self, live: ReadyAgent, result: CellResult, names: Sequence[str], dtype_backend: str) -> None:
        for name in names:
            got = next((t for t in result.tables if t.name == name), None)
            if got is not None and not got.truncated:
                result.full_tables[name] = got
                continue
            try:
                result.full_tables[name] = self._fetch(live, name, None, dtype_backend)
            except DhvmError:
                pass  # the caller says which name was missing

    # -- other requests ----------------------------------------------------------------------------

    def _request(self, live: ReadyAgent, header: dict, on_frame=None, timeout: float | None = 60,
                 abandon: bool = False, rid: int | None = None, grace: float = CANCEL_GRACE_S) -> dict:
        errors: list[dict] = []

        def collect(frame: P.Frame) -> None:
            if frame.header.get("ev") == P.EV_ERROR:
                errors.append(frame.header)
            elif on_frame:
                on_frame(frame)

        try:
            done = live.client.request(header, (), collect, timeout=timeout, abandon=abandon, rid=rid, grace=grace)
        except (AgentDied, AgentUnresponsive) as e:
            what = header.get("op")
            cause = memory.death_cause(live.instance) if isinstance(e, AgentDied) and not e.death else None
            why = cause.told() if cause else _first_line(e)
            tail = self._lost(live, f"the session's VM was replaced after it failed during a '{what}' request "
                                    f"({why}); variables and tables of earlier cells are gone", why)
            raise AgentDied(f"{cause.cell_error() if cause else e}\n{tail}", getattr(e, "death", None)) from None
        if errors:
            raise AgentRefused(f"{errors[0].get('name')}: {errors[0].get('value')}")
        return done

    def _simple(self, header: dict, on_frame=None, timeout: float | None = 60) -> dict:
        """A request to the session's own server (started if needed)."""
        with self._lock:
            self.start()
            assert self.live is not None
            return self._request(self.live, header, on_frame, timeout)

    def _fetch(self, live: ReadyAgent, name: str, max_rows: int | None, dtype_backend: str) -> TableResult:
        got: list[TableResult] = []

        def on_frame(frame: P.Frame) -> None:
            if frame.header.get("ev") == P.EV_TABLE:
                got.append(table_from_event(frame.header, frame.payloads[0], dtype_backend))

        self._request(live, {"op": P.OP_FETCH, "name": name, "max_rows": max_rows}, on_frame, timeout=None)
        return got[0]

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
            self.start()
            assert self.live is not None
            feed = LiveFeed(self.live.client, name, on_update, on_end, rows=rows, head=head, rate=rate,
                            dtype_backend=dtype_backend)
            self._feeds = [f for f in self._feeds if f.running]
            self._feeds.append(feed)
            return feed.start()

    def live_views(self) -> list[LiveFeed]:
        """The live views still running."""
        with self._lock:
            return [f for f in self._feeds if f.running]

    def stop_live(self, name: str | None = None, reason: str = "stopped") -> int:
        """End the live views (of table ``name``, or all); returns how many were running."""
        with self._lock:
            chosen = [f for f in self._feeds if name is None or f.name == name]
            self._feeds = [f for f in self._feeds if f not in chosen and f.running]
        running = [f for f in chosen if f.running]
        for f in chosen:
            f.stop(reason, wait=0)  # all cancels go out first; then each gets its grace
        for f in chosen:
            f.join()
        return len(running)

    def _per_cell_note(self, what: str) -> DhvmError:
        return UsageError(f"{what}: in per-cell mode no server outlives its cell, so there is nothing to ask. "
                         f"Use -o NAME on the cell, or switch: %config Dhvm.mode = 'per-session'")

    def tables(self) -> list[dict]:
        """The Deephaven tables in the session's scope: name, rows, columns, refreshing."""
        if self.mode == "per-cell":
            raise self._per_cell_note("no tables to list")
        return self._simple({"op": P.OP_TABLES})["tables"]

    def fetch(self, name: str, max_rows: int | None = DEFAULT_MAX_ROWS,
              dtype_backend: str = DEFAULT_DTYPE_BACKEND) -> TableResult:
        """One table from the session's scope (its first ``max_rows`` rows)."""
        if self.mode == "per-cell":
            raise self._per_cell_note(f"cannot fetch {name!r}")
        with self._lock:
            self.start()
            assert self.live is not None
            return self._fetch(self.live, name, max_rows, dtype_backend)

    def fetch_to(self, name: str, path: str | os.PathLike, fmt: str | None = None, force: bool = False,
                 progress: bool | None = None) -> "WrittenFile":
        """The whole table ``name``, streamed batch by batch into a local parquet, CSV or Arrow file (by
        ``path``'s extension, or ``fmt``), with the types of ``tables.PlainBatches``. An existing file is
        refused unless ``force``; a failed or interrupted fetch leaves nothing under ``path``.
        ``progress``: a bar on stderr (None: for big tables)."""
        from .tablefiles import check_target

        target, fmt = check_target(path, fmt, force)  # before anything is asked of the server
        if self.mode == "per-cell":
            raise self._per_cell_note(f"cannot fetch {name!r}")
        with self._lock:
            self.start()
            assert self.live is not None
            return self._fetch_to(self.live, name, target, fmt, force, progress)

    def _fetch_to(self, live: ReadyAgent, name: str, target, fmt: str, force: bool,
                  progress: bool | None) -> "WrittenFile":
        import pyarrow as pa

        from .tablefiles import TableFileWriter

        rid = live.client.new_id()
        # A write error stops the stream (a cancel, as a Ctrl-C would), so the server is free at once.
        writer = TableFileWriter(target, fmt, name, force=force, progress=progress,
                                 on_error=lambda e: live.client.stop(rid))

        def on_frame(frame: P.Frame) -> None:
            try:
                kind = frame.header.get("ev")
                if kind == P.EV_TABLE:
                    writer.begin(frame.header.get("rows", 0), pa.ipc.read_schema(pa.py_buffer(frame.payloads[0])))
                elif kind == P.EV_BATCH and writer.source is not None:
                    writer.write(pa.ipc.read_record_batch(pa.py_buffer(frame.payloads[0]), writer.source))
            except BaseException as e:  # noqa: BLE001 - a Ctrl-C or a bad message: stop the stream, raise it after
                writer.fail(e)

        with writer:  # any exception removes the temporary file
            try:
                # A cancel takes effect between batches, after the slice being converted (seconds in a VM).
                done = self._request(live, {"op": P.OP_FETCH, "name": name, "stream": True}, on_frame,
                                     timeout=None, rid=rid, grace=STREAM_CANCEL_GRACE_S)
            except AgentRefused as e:
                writer.check()  # the writer's own failure is what stopped the stream
                if str(e).startswith("KeyboardInterrupt"):  # Ctrl-C: the agent stopped streaming
                    raise KeyboardInterrupt from None
                raise
            return writer.finish(done.get("rows"))

    def _ask(self, header: dict, empty: dict) -> dict:
        """A read-only question (completion, inspection). It never starts, stops or replaces a VM and
        never waits for a cell: no server yet (or a busy one past QUESTION_DEADLINE_S) gives ``empty``,
        and the late answer is dropped. Per-cell mode asks a warm VM of the pool."""
        live = self.pool.peek() if self.mode == "per-cell" else self.live
        if live is None or live.client.dead is not None:
            return empty
        try:
            return self._request(live, {**header, "deadline_s": QUESTION_DEADLINE_S}, timeout=QUESTION_DEADLINE_S,
                                 abandon=True)
        except AnswerAbandoned:
            return empty

    def complete(self, code: str, cursor_pos: int) -> dict:
        """Completions answered by the agent from the live namespace: matches, cursor_start, cursor_end."""
        return self._ask({"op": P.OP_COMPLETE, "code": code, "cursor_pos": cursor_pos},
                         {"matches": [], "cursor_start": cursor_pos, "cursor_end": cursor_pos})

    def inspect(self, code: str, cursor_pos: int, detail_level: int = 0) -> dict:
        """What the agent knows about the name at the cursor: found, data (a MIME bundle)."""
        return self._ask({"op": P.OP_INSPECT, "code": code, "cursor_pos": cursor_pos, "detail_level": detail_level},
                         {"found": False, "data": {}})

    def stats(self) -> dict:
        """Agent statistics (cells run, memory, uptime)."""
        return {k: v for k, v in self._simple({"op": P.OP_STATS}).items() if k not in ("ev", "re", "status")}

    # Web links (weblinks.py): outputs carry one-time links of this process's link broker, never the key.
    def deephaven_address(self) -> tuple[str, int] | None:
        """Where the host reaches the session's Deephaven server (127.0.0.1 and a port), if running."""
        return weblinks.deephaven_address(self)

    def widget_url(self, name: str) -> str | None:
        """A one-time link to the web UI's view of one widget (a Deephaven Figure) by the variable that holds it."""
        return weblinks.widget_url(self, name)

    def _widget_links(self, data: dict) -> dict:
        return weblinks.widget_links(self, data)

    def ide_url(self, name: str | None = None) -> str:
        """A one-time link to the server's web UI (the console, or the table or figure ``name`` holds)."""
        return weblinks.ide_url(self, name)

    def deephaven_url(self) -> str | None:
        """A one-time link to the web IDE of the running server (None: none running)."""
        return weblinks.console_link(self)

    def pydeephaven_session(self, **kwargs):
        """A pydeephaven Session on the session's server, logged in with this instance's key."""
        return weblinks.pydeephaven_session(self, **kwargs)

    def status(self) -> dict:
        """What ``%dhvm status`` shows: backend, instance, server, without starting anything."""
        out = {"backend": self.backend_name, "mode": self.mode, "running": self.running,
               "dhg_home": str(self.layout.home)}
        cluster_host = os.environ.get(CLUSTER_HOST_ENV)
        if cluster_host:
            out["cluster_host"] = f"{cluster_host} (this kernel and its VMs run there)"
        if self._pool is not None:
            out["warm_pool"] = self._pool.describe()
        if self.passed_over:
            out["not_chosen"] = self.passed_over
        try:
            out.update(self.backend.describe())
        except DhvmError as e:  # status must not fail on a broken backend
            out["backend_error"] = str(e)
        if self.instance is not None:
            out["instance"] = self.instance.describe()
            out["server"] = self.info.get("server")
            out.update(weblinks.status_fields(self, cluster_host))
            out["deephaven_version"] = self.info.get("deephaven_version")
            out["files_pushed"] = len(self.pushed)
            out["started_from"] = f"checkpoint {self.live.checkpoint}" if self.live.checkpoint else "base snapshot"
        return out


def _mb(n) -> float | None:
    return round(n / 2**20, 1) if isinstance(n, (int, float)) else None


def _process_rss(proc) -> int | None:
    """Resident bytes of a VMM process (its guest's memory in use, on this host)."""
    try:
        for line in open(f"/proc/{proc.pid}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (AttributeError, OSError, ValueError):
        return None
    return None


def _first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0]


def _death_message(e: AgentDied, backend: str, cause: "memory.Death | None" = None) -> str:
    """What a cell says when its server died under it: why (from the VM's init when it could tell, or from
    the host: its OOM killer, a kill), what is lost, and what to do."""
    if cause is not None:
        return cause.cell_error()
    death = e.death or {}
    what = death.get("reason") or f"the Deephaven {backend} instance died during the cell ({_first_line(e)})"
    msg = f"{what}. The next cell starts a fresh server; variables and tables are lost."
    if death.get("oom"):
        ram_mb = max(4096, int(death["oom"].get("mem_total_kb", 0) / 1024 * 2) // 512 * 512)
        msg += (f" Use less memory in the cell, or give the VM more: dhvm prepare --ram-mb {ram_mb} --heap "
                f"{ram_mb * 6 // 10}m --rebuild")
    return msg


def stop_all_sessions(wait: float | None = None) -> None:
    """Destroy every live session's instance (at exit and on SIGTERM).

    ``wait``: how long to wait for a session that is busy (starting a VM in another thread, say);
    past that, its instances are destroyed by their records, without the session's lock.
    """
    from .instances import destroy, list_instances

    for s in list(_live_sessions):
        try:
            if wait is None:
                s.stop()
            elif s._lock.acquire(timeout=wait):
                try:
                    s.stop()
                finally:
                    s._lock.release()
            else:
                for rec in list_instances(s.layout):
                    if rec.owner_pid == os.getpid():
                        destroy(rec)
        except Exception:
            pass


_hooks_installed: str | bool = False


def install_exit_hooks() -> None:
    """Stop every session at exit and on SIGTERM. Call it from the main thread (the magic's ``load``
    does), since only that thread may set a signal handler; from another thread only the exit hook
    is set. (Whatever else happens, the watchdog destroys a dead process's instances.)"""
    global _hooks_installed
    on_main = threading.current_thread() is threading.main_thread()
    if _hooks_installed and (_hooks_installed == "signal" or not on_main):
        return
    if not _hooks_installed:
        atexit.register(stop_all_sessions)
    _hooks_installed = "signal" if on_main else "atexit"
    if on_main and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        def on_term(signum, frame):
            stop_all_sessions(wait=1.0)  # a VM still starting in another thread must not hold us up
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)

        signal.signal(signal.SIGTERM, on_term)
