"""The host's request layer: a started instance and its agent (a ``Server``), and every request sent to it.

This mirrors the guest's handler table (``guest/agent.py``): one method per operation — ``run_cell``,
``fetch``, ``fetch_to``, ``tables``, ``stats``, ``complete``, ``inspect``, ``watch``, ``web`` — and
nothing else in the host names a protocol operation (``client.py`` below it carries the frames). A
request during which the agent dies or stops answering tears the server down through ``lost``, which
the owning session sets to announce the replacement; the error says why (the VM's init, the host's
OOM killer, a kill) and what is lost.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Sequence

from . import protocol as P
from .client import AgentClient
from .config import CANCEL_GRACE_S, QUESTION_DEADLINE_S, STREAM_CANCEL_GRACE_S
from .errors import AgentDied, AgentRefused, AgentStartError, AgentUnresponsive, AnswerAbandoned, DhvmError
from .files import CellInput, PushFile, Pushed, files_to_send
from .live import LiveFeed, LiveUpdate
from .result import CellEvents, CellResult, DisplayOutput, ExecutionError, Stream, TableResult, table_from_event
from .vm import Backend, Instance, memory

if TYPE_CHECKING:
    from .tablefiles import WrittenFile

# Told when a server is torn down: (the server, what to announce in the next cell, why it ended) -> its log tail.
OnLost = Callable[["Server", "str | None", "str | None"], str]


@dataclass
class Server:
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
    pushed: dict[str, Pushed] = field(default_factory=dict)
    """Files this agent already has (so an unchanged file is not sent twice)."""
    on_lost: OnLost | None = field(default=None, repr=False)
    """The owner's teardown of a dead or stuck server (default: just close it)."""
    web_time_zone: str | None = None
    """The web UI's time zone this server was given (``web``)."""

    def close(self) -> None:
        self.client.close()
        self.instance.stop()

    @property
    def dead(self) -> bool:
        return self.client.dead is not None or not self.instance.alive()

    def lost(self, announce: str | None = None, why: str | None = None) -> str:
        """Tear down this dead or stuck server; returns its log tail for the error message."""
        if self.on_lost is not None:
            return self.on_lost(self, announce, why)
        tail = self.instance.log_tail()
        self.close()
        return tail

    # -- cells -------------------------------------------------------------------------------------

    def run_cell(self, code: str, files: Sequence[PushFile], *, label: str, max_rows: int | None,
                 timeout: float | None, dtype_backend: str, on_stdout: Stream | None, on_stderr: Stream | None,
                 on_display: Callable[[DisplayOutput], None] | None = None, inputs: Sequence[CellInput] = (),
                 execution_count: int | None = None, bundle: Callable[[dict], dict] | None = None) -> CellResult:
        """Run one cell (``label``: the backend's name, for messages); output goes to the callbacks as it arrives."""
        metas, datas, record = files_to_send(self.pushed, files)
        result = CellResult(backend=f"{label} ({self.instance.id})", files=[m["path"] for m in metas])
        header = {"op": P.OP_EXEC, "code": code, "options": {"max_rows": max_rows}}
        if execution_count is not None:
            header["execution_count"] = execution_count
        if metas:
            header["files"] = metas  # their payloads come first, in order
        if inputs:  # each input's payload follows, named by its index
            header["inputs"] = [{"name": i.name, "kind": i.kind, "payload": len(datas) + n} for n, i in enumerate(inputs)]
            datas.extend(i.payload for i in inputs)
        events = CellEvents(result, dtype_backend, on_stdout, on_stderr, on_display, bundle=bundle)
        t1 = time.perf_counter()
        done: dict = {}
        try:
            done = self.client.request(header, datas, events, timeout=timeout)
        except AgentUnresponsive as e:
            tail = self.lost(why=str(e))
            result.status = "cancelled"
            result.error = ExecutionError("KeyboardInterrupt", f"{e}; the {label} instance was "
                                          "replaced and its state (tables, variables) is lost. "
                                          "The next cell starts a fresh server.", [tail])
        except AgentDied as e:
            cause = None if e.death else memory.death_cause(self.instance)  # before lost()'s own kill
            message = death_message(e, label, cause)
            tail = self.lost(why=message)
            result.status = "error"
            result.error = ExecutionError("AgentDied", message, [tail])
        else:
            if "exec_ms" in done.get("timings", {}):
                self.pushed.update(record)  # the files were written (even if the cell then failed)
        events.finish(done)  # without a done (the agent was lost), status and error were set above
        if done and timeout and result.status == "cancelled" and not done.get("interrupted") and result.error:
            result.error.value = f"cell timed out after {timeout:g}s (--timeout) and was cancelled"
        result.timings = {**done.get("timings", {}), "roundtrip_ms": round((time.perf_counter() - t1) * 1000, 3)}
        return result

    def fetch_full(self, result: CellResult, names: Sequence[str], dtype_backend: str) -> None:
        """Tables ``names`` whole (for ``-o``) into ``result.full_tables``; a missing one is left out."""
        for name in names:
            got = next((t for t in result.tables if t.name == name), None)
            if got is not None and not got.truncated:
                result.full_tables[name] = got
                continue
            try:
                result.full_tables[name] = self.fetch(name, None, dtype_backend)
            except DhvmError:
                pass  # the caller says which name was missing

    # -- other requests ----------------------------------------------------------------------------

    def request(self, header: dict, on_frame=None, timeout: float | None = 60, abandon: bool = False,
                rid: int | None = None, grace: float = CANCEL_GRACE_S) -> dict:
        """One request other than a cell: the agent's refusal is an AgentRefused; its death (or a stuck
        agent) tears the server down (``lost``) and is an AgentDied saying why."""
        errors: list[dict] = []

        def collect(frame: P.Frame) -> None:
            if frame.header.get("ev") == P.EV_ERROR:
                errors.append(frame.header)
            elif on_frame:
                on_frame(frame)

        try:
            done = self.client.request(header, (), collect, timeout=timeout, abandon=abandon, rid=rid, grace=grace)
        except (AgentDied, AgentUnresponsive) as e:
            what = header.get("op")
            cause = memory.death_cause(self.instance) if isinstance(e, AgentDied) and not e.death else None
            why = cause.told() if cause else first_line(e)
            tail = self.lost(f"the session's VM was replaced after it failed during a '{what}' request "
                             f"({why}); variables and tables of earlier cells are gone", why)
            raise AgentDied(f"{cause.cell_error() if cause else e}\n{tail}", getattr(e, "death", None)) from None
        if errors:
            raise AgentRefused(f"{errors[0].get('name')}: {errors[0].get('value')}")
        return done

    def fetch(self, name: str, max_rows: int | None, dtype_backend: str) -> TableResult:
        """Table ``name`` (its first ``max_rows`` rows; None: whole)."""
        got: list[TableResult] = []

        def on_frame(frame: P.Frame) -> None:
            if frame.header.get("ev") == P.EV_TABLE:
                got.append(table_from_event(frame.header, frame.payloads[0], dtype_backend))

        self.request({"op": P.OP_FETCH, "name": name, "max_rows": max_rows}, on_frame, timeout=None)
        return got[0]

    def fetch_to(self, name: str, target, fmt: str, force: bool, progress: bool | None) -> "WrittenFile":
        """The whole table ``name``, streamed batch by batch into the local file ``target`` (parquet, CSV or
        Arrow: ``fmt``) with the types of ``tables.PlainBatches``; a failed or interrupted fetch leaves
        nothing there. ``progress``: a bar on stderr (None: for big tables)."""
        import pyarrow as pa

        from .tablefiles import TableFileWriter

        rid = self.client.new_id()
        # A write error stops the stream (a cancel, as a Ctrl-C would), so the server is free at once.
        writer = TableFileWriter(target, fmt, name, force=force, progress=progress,
                                 on_error=lambda e: self.client.stop(rid))

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
                done = self.request({"op": P.OP_FETCH, "name": name, "stream": True}, on_frame,
                                    timeout=None, rid=rid, grace=STREAM_CANCEL_GRACE_S)
            except AgentRefused as e:
                writer.check()  # the writer's own failure is what stopped the stream
                if str(e).startswith("KeyboardInterrupt"):  # Ctrl-C: the agent stopped streaming
                    raise KeyboardInterrupt from None
                raise
            return writer.finish(done.get("rows"))

    def tables(self) -> list[dict]:
        """The Deephaven tables in the server's scope: name, rows, columns, refreshing."""
        return self.request({"op": P.OP_TABLES})["tables"]

    def stats(self) -> dict:
        """Agent statistics (cells run, memory, uptime)."""
        return {k: v for k, v in self.request({"op": P.OP_STATS}).items() if k not in ("ev", "re", "status")}

    def ask(self, header: dict, empty: dict) -> dict:
        """A read-only question: a busy agent past QUESTION_DEADLINE_S gives ``empty`` (the late answer
        is dropped), and so does a dead one; it never replaces the server."""
        if self.client.dead is not None:
            return empty
        try:
            return self.request({**header, "deadline_s": QUESTION_DEADLINE_S}, timeout=QUESTION_DEADLINE_S,
                                abandon=True)
        except AnswerAbandoned:
            return empty

    def complete(self, code: str, cursor_pos: int) -> dict:
        """Completions answered from the live namespace: matches, cursor_start, cursor_end."""
        return self.ask({"op": P.OP_COMPLETE, "code": code, "cursor_pos": cursor_pos},
                        {"matches": [], "cursor_start": cursor_pos, "cursor_end": cursor_pos})

    def inspect(self, code: str, cursor_pos: int, detail_level: int = 0) -> dict:
        """What the agent knows about the name at the cursor: found, data (a MIME bundle)."""
        return self.ask({"op": P.OP_INSPECT, "code": code, "cursor_pos": cursor_pos, "detail_level": detail_level},
                        {"found": False, "data": {}})

    def type_of(self, name: str) -> dict:
        """The agent's inspection of variable ``name`` (waits for a busy agent, unlike ``inspect``)."""
        return self.request({"op": P.OP_INSPECT, "code": name, "cursor_pos": len(name), "detail_level": 0})

    def web(self, time_zone: str) -> dict:
        """Set the web UI's time zone on the server; the answer holds the zone it now has."""
        return self.request({"op": P.OP_WEB, "time_zone": time_zone})

    def watch(self, name: str, on_update: Callable[[LiveUpdate], None], on_end: Callable[[str], None] | None,
              *, rows: int, head: bool, rate: float, dtype_backend: str) -> LiveFeed:
        """A live view of ``name`` (not started: ``LiveFeed.start``)."""
        return LiveFeed(self.client, {"op": P.OP_WATCH, "name": name, "rows": rows, "head": head, "rate": rate},
                        on_update, on_end, dtype_backend=dtype_backend)


def start_server(backend: Backend, checkpoint: str | None = None, make: Callable[[], Instance] | None = None,
                 origin: str | None = None, headroom_mb: int | None = None) -> Server:
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
    return Server(instance, client, hello, (time.perf_counter() - t0) * 1000,
                  checkpoint=origin or checkpoint or backend.start_from)


def first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0]


def death_message(e: AgentDied, backend: str, cause: "memory.Death | None" = None) -> str:
    """What a cell says when its server died under it: why (from the VM's init when it could tell, or from
    the host: its OOM killer, a kill), what is lost, and what to do."""
    if cause is not None:
        return cause.cell_error()
    death = e.death or {}
    what = death.get("reason") or f"the Deephaven {backend} instance died during the cell ({first_line(e)})"
    msg = f"{what}. The next cell starts a fresh server; variables and tables are lost."
    if death.get("oom"):
        ram_mb = max(4096, int(death["oom"].get("mem_total_kb", 0) / 1024 * 2) // 512 * 512)
        msg += (f" Use less memory in the cell, or give the VM more: dhvm prepare --ram-mb {ram_mb} --heap "
                f"{ram_mb * 6 // 10}m --rebuild")
    return msg
