"""One conversation with an agent: hello and version check, the after-restore handshake, requests
with their streamed events, cancels and deadlines. Sessions, backends (restores) and ``dhvm prepare``
(the cold boot's warm-up) all speak to agents through this one client.

A reader thread routes every incoming frame to the request it answers (by ``re``), so several
requests may be in flight on one connection (a completion while a cell runs) without taking each
other's events. Answers that arrive after their request was abandoned are dropped. Frames that
answer nothing say the agent is gone (``agent_exit`` from the VM's init, or the end of the stream):
every waiting request then fails with AgentDied at once, and so does every later one.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from typing import Callable, Sequence

from . import protocol as P
from .config import CANCEL_GRACE_S, CLOCK_NOTICE_S
from .errors import (AgentDied, AgentRefused, AgentStartError, AgentUnresponsive, AnswerAbandoned, CellTooLarge,
                     DhvmError, ProtocolMismatch)

Tick = tuple[float, Callable[[], None]]
"""(seconds, check): while a request waits, ``check`` runs every so often and may raise to give up."""


class _Gone:
    """Queued to every waiting request when the stream is dead."""

    def __init__(self, why: str, death: dict | None):
        self.why = why
        self.death = death


class _Stop:
    """Queued to a request that another thread ends (``AgentClient.stop``): cancel it, as an interrupt would."""


class AgentClient:
    """Requests and events over one connection to an agent.

    ``clock_notices``: send the host's wall clock every CLOCK_NOTICE_S (VMs, whose clocks drift).
    """

    def __init__(self, sock, clock_notices: bool = False):
        self.stream = P.FrameStream(sock)
        self._next_id = 0
        self._lock = threading.Lock()
        self._waiting: dict[int, queue.Queue] = {}
        self.dead: str | None = None
        """Why the agent stream is dead (None while it works)."""
        self.death: dict | None = None
        """The VM init's ``agent_exit`` report, when the agent process died."""
        self._closed = threading.Event()
        self._clock_lock = threading.Lock()
        self._clock_held = False
        self._open = threading.Event()
        """Clear while a checkpoint holds the agent: no request may be half sent when the VM is saved."""
        self._open.set()
        self._reader = threading.Thread(target=self._read_loop, name="dhg-client-reader", daemon=True)
        self._reader.start()
        if clock_notices:
            threading.Thread(target=self._clock_loop, name="dhg-client-clock", daemon=True).start()

    # -- incoming ----------------------------------------------------------------------------------

    def _read_loop(self) -> None:
        while True:
            try:
                frame = self.stream.recv()
            except (P.ConnectionClosed, P.ProtocolError, OSError) as e:
                self._die(f"connection to the agent lost: {e}", None)
                return
            h = frame.header
            if h.get("ev") == P.EV_AGENT_EXIT:
                self._die(h.get("reason") or "the agent process died", h)
                return  # the VM's stream now belongs to a restarting agent: this client is done
            re = h.get("re")
            with self._lock:
                if re is None:
                    targets = list(self._waiting.values())  # a protocol error about no request in particular
                else:
                    targets = [self._waiting[re]] if re in self._waiting else []  # else: an abandoned answer
            for q in targets:
                q.put(frame)

    def _die(self, why: str, death: dict | None) -> None:
        with self._lock:
            if self.dead is None:
                self.dead, self.death = why, death
            gone = _Gone(self.dead, self.death)
            for q in self._waiting.values():
                q.put(gone)

    def _clock_loop(self) -> None:
        while not self._closed.wait(CLOCK_NOTICE_S):
            if self.dead is not None:
                return
            with self._clock_lock:
                if self._clock_held:
                    continue  # a checkpoint is being taken: nothing may be in flight
                try:
                    self.stream.send({"op": P.OP_CLOCK, "now_ns": time.time_ns()})
                except OSError:
                    return

    # -- the conversation's fixed steps -----------------------------------------------------------

    def hello(self, timeout: float, tick: Tick | None = None) -> dict:
        """Greet the agent and check it speaks this host's protocol; returns its hello (versions, server)."""
        try:
            done = self.request({"op": P.OP_HELLO, "version": P.PROTOCOL_VERSION}, timeout=timeout, abandon=True,
                                tick=tick)
        except AnswerAbandoned:
            raise AgentStartError(f"the agent did not answer hello within {timeout:g}s") from None
        if done.get("version") != P.PROTOCOL_VERSION:
            raise ProtocolMismatch(f"the agent speaks protocol {done.get('version')}, this host "
                                   f"{P.PROTOCOL_VERSION}: the image is older than the host code. "
                                   f"Run: dhvm prepare --rebuild")
        return done

    def restored(self, key: str, timeout: float) -> dict:
        """After a snapshot restore: give the guest the host's clock, fresh entropy and its own login key,
        so clones of one snapshot neither live in the past, nor share random numbers, nor a key (the
        snapshot holds none: until this, every login is refused). Returns the agent's answer."""
        try:
            # The key travels on the agent stream only (a 0600 socket in a 0700 dir, or vsock).
            done = self.request({"op": P.OP_RESTORED, "time_ns": time.time_ns(), "key": key}, [os.urandom(64)],
                                timeout=timeout, abandon=True)
        except AnswerAbandoned:
            raise AgentStartError(f"the restored agent did not answer within {timeout:g}s") from None
        return {k: v for k, v in done.items() if k not in ("ev", "re", "status")}

    def hold(self, timeout: float) -> dict:
        """Before a checkpoint: returns once the agent has nothing half sent and will send nothing more
        (and this client sends nothing) until ``resume``, or a restored VM's ``restored``. Its answer
        names the tables the session holds."""
        with self._clock_lock:
            self._clock_held = True
        self._open.clear()  # before the hold goes: a request sent after it could be half read when saved
        try:
            done = self.request({"op": P.OP_HOLD}, timeout=timeout, abandon=True)
        except BaseException:
            self.resume(timeout)
            raise
        return {k: v for k, v in done.items() if k not in ("ev", "re", "status")}

    def resume(self, timeout: float) -> None:
        """After a checkpoint: the agent (and this client's clock notices) carry on."""
        try:
            self.request({"op": P.OP_RESUME}, timeout=timeout)
        finally:
            self._open.set()
            with self._clock_lock:
                self._clock_held = False

    def run_code(self, code: str, on_frame: Callable[[P.Frame], None] | None, timeout: float,
                 max_rows: int = 10) -> dict:
        """A bare cell, with no files, inputs or session around it (``dhvm prepare``'s warm-up cells;
        a session's cells go through ``Server.run_cell``)."""
        return self.request({"op": P.OP_EXEC, "code": code, "options": {"max_rows": max_rows}}, on_frame=on_frame,
                            timeout=timeout)

    @property
    def held(self) -> bool:
        """True while a checkpoint holds the agent."""
        return not self._open.is_set()

    # -- outgoing ----------------------------------------------------------------------------------

    def close(self) -> None:
        self._closed.set()
        self.stream.close()

    def new_id(self) -> int:
        with self._lock:
            self._next_id += 1
            return self._next_id

    def _send(self, header: dict, payloads: Sequence = ()) -> None:
        if header.get("op") not in (P.OP_HOLD, P.OP_RESUME, P.OP_CANCEL):
            self._open.wait()  # a checkpoint is being saved: what comes next goes after it
        try:
            # The host's clock travels with every request (see the agent's Clock).
            self.stream.send({**header, "now_ns": time.time_ns()}, payloads)
        except P.HeaderTooLarge as e:
            if header.get("op") == P.OP_EXEC:
                size = len(header.get("code", "").encode())
                raise CellTooLarge(
                    f"this cell is {size / 2**20:.1f} MiB of code, over the {P.MAX_HEADER_BYTES / 2**20:.0f} MiB a "
                    f"cell's code may take (it travels in one request header). Put the data in a workspace "
                    f"file instead (e.g. data.json or data.csv) and read it in the cell: files the cell names "
                    f"are pushed as payloads, up to --max-push-mb (50 MiB by default).") from None
            raise DhvmError(f"could not send the request: {e}") from None
        except P.ProtocolError as e:
            raise DhvmError(f"could not send the request: {e}") from None
        except OSError as e:
            self._die(f"connection to the agent lost: {e}", None)
            raise AgentDied(self.dead or str(e), self.death) from None

    def stop(self, rid: int) -> bool:
        """End request ``rid`` from another thread: it is cancelled (the agent then sends its done, which
        its ``request`` returns). False if it is not waiting (already done)."""
        with self._lock:
            frames = self._waiting.get(rid)
        if frames is not None:
            frames.put(_Stop())
        return frames is not None

    def request(self, header: dict, payloads: Sequence = (), on_frame: Callable[[P.Frame], None] | None = None,
                timeout: float | None = None, abandon: bool = False, tick: Tick | None = None,
                rid: int | None = None, grace: float = CANCEL_GRACE_S) -> dict:
        """Send a request and handle its events until its ``done``; returns the done header.

        Past ``timeout``: with ``abandon`` the answer is dropped (AnswerAbandoned; the agent is left
        alone, its late answer discarded); otherwise a cancel is sent and the agent gets
        ``grace`` seconds (CANCEL_GRACE_S) to finish, past which (or on a second interrupt) AgentUnresponsive.
        A KeyboardInterrupt cancels the same way, and so does ``stop(rid)`` from another thread (``rid``:
        an id from ``new_id()``, for the caller to know it). ``tick``: a check run while waiting (see Tick).
        """
        if self.dead is not None:
            raise AgentDied(self.dead, self.death)
        if abandon and self.held and header.get("op") not in (P.OP_HOLD, P.OP_RESUME):
            # A question (Tab, Shift-Tab) while a checkpoint is saved: no answer rather than a wait.
            raise AnswerAbandoned("the agent is held for a checkpoint; the question was not asked")
        rid = rid or self.new_id()
        frames: queue.Queue = queue.Queue()
        with self._lock:
            self._waiting[rid] = frames
            if self.dead is not None:
                frames.put(_Gone(self.dead, self.death))
        try:
            self._send({**header, "id": rid}, payloads)
            return self._wait(rid, frames, on_frame, timeout, abandon, tick, grace)
        finally:
            with self._lock:
                self._waiting.pop(rid, None)

    def _wait(self, rid: int, frames: queue.Queue, on_frame, timeout: float | None, abandon: bool,
              tick: Tick | None, grace: float) -> dict:
        deadline = time.monotonic() + timeout if timeout else None
        cancel_deadline: float | None = None
        interrupted = False
        while True:
            limit = cancel_deadline if cancel_deadline is not None else deadline
            wait = None if limit is None else max(0.0, limit - time.monotonic())
            if tick is not None:
                wait = tick[0] if wait is None else min(wait, tick[0])
            try:
                item = frames.get(timeout=wait)
            except queue.Empty:
                if tick is not None and (limit is None or time.monotonic() < limit):
                    tick[1]()
                    continue
                if abandon:
                    raise AnswerAbandoned(f"no answer within {timeout:g}s; the answer was dropped") from None
                if cancel_deadline is None:
                    cancel_deadline = self._cancel(rid, grace)
                    continue
                raise AgentUnresponsive(
                    f"the cell did not stop within {grace:g}s of being cancelled") from None
            except KeyboardInterrupt:
                if cancel_deadline is not None:
                    raise AgentUnresponsive("interrupted twice; the cell did not stop") from None
                interrupted = True
                cancel_deadline = self._cancel(rid, grace)
                continue
            if isinstance(item, _Gone):
                raise AgentDied(item.why, item.death)
            if isinstance(item, _Stop):
                if cancel_deadline is None:
                    cancel_deadline = self._cancel(rid, grace)
                continue
            ev = item.header
            if ev.get("ev") == P.EV_ERROR and ev.get("re") is None:
                raise AgentRefused(f"the agent rejected a frame: {ev.get('name')}: {ev.get('value')}")
            if on_frame:
                on_frame(item)
            if ev.get("ev") == P.EV_DONE:
                if interrupted and ev.get("status") == "cancelled":
                    ev["interrupted"] = True
                return ev

    def _cancel(self, rid: int, grace: float = CANCEL_GRACE_S) -> float:
        try:
            # Its own id, whose answer nobody waits for (dropped by the reader).
            self._send({"op": P.OP_CANCEL, "id": self.new_id(), "target": rid})
        except DhvmError:
            pass
        return time.monotonic() + grace
