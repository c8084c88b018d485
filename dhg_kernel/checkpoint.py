"""Saving a running session as a checkpoint: hold the agent still, let the backend save the VM, let it go.

The agent is held (``AgentClient.hold``) so that nothing is half sent in either direction while the
VM is saved: a VM restored from the checkpoint then starts on a clean stream, where its new host's
handshake is the first frame. The session that was saved carries on afterwards (``resume``); its
live views pause for the save and go on.

Also here: what a session does with checkpoints (``save_session``, ``restore_session``, ``fork_session``,
``check_start_from``), which ``Session``'s methods of the same purpose call. Where the files go and how
they are checked is ``vm/checkpoint_store``; how a VM is saved is each backend's ``checkpoint``.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Callable, Iterator

from .client import AgentClient
from .errors import AgentDied, CheckpointError, UsageError
from .instances import proc_start_time
from .server import Server, start_server
from .vm import Backend, Instance
from .vm import checkpoint_store as store

# ``Session`` in annotations is session.py's: not imported, as session.py imports this module.

# How long the agent may take to reach its quiet point (it finishes the frame it is sending).
HOLD_TIMEOUT_S = 30.0


def save(backend: Backend, instance: Instance, client: AgentClient | None, name: str, overwrite: bool = False,
         source: dict | None = None, temporary: bool = False) -> store.Checkpoint:
    """Save the running ``instance`` as checkpoint ``name``; it runs on afterwards.

    ``source``: what the checkpoint was made from (shown by ``checkpoint info``); ``temporary``: a
    fork's checkpoint, removed once the fork has started (and, if its maker dies first, by the next
    listing). ``client`` None: a VM without our agent (the Firecracker tests' minimal guest), saved as is."""
    store.check_name(name)
    if not backend.can_checkpoint:
        raise CheckpointError(backend.no_checkpoints())
    if client is not None and client.dead is not None:
        raise CheckpointError(f"the session's server is gone ({client.dead}); nothing to checkpoint. "
                              f"Run a cell (it starts a fresh server), then checkpoint again")
    base = backend.base_snapshot()
    t0 = time.perf_counter()
    with store.writing(backend.layout, name, overwrite, backend.checkpoint_bytes(instance)) as work:
        with _held(client) as (held, release):
            # The backend releases the agent as soon as the VM runs again (before it writes the files).
            meta = backend.checkpoint(instance, work, release)
        info = {"name": name, "tables": held.get("tables", []), "source": source or {},
                "base": {"key": base.meta.get("key"), "created": base.meta.get("created"), "dir": str(base.dir)},
                "save_s": round(time.perf_counter() - t0, 2)}
        if temporary:
            info.update(temporary_for_pid=os.getpid(), temporary_for_start=proc_start_time(os.getpid()))
        store.finish(work, meta, info, backend.checkpoint_writable_files)
    return store.load(backend.layout, name)


def fork(backend: Backend, instance: Instance, client: AgentClient) -> Instance:
    """A second VM running on from ``instance``'s state now, held still around the copy as for a save,
    for backends that copy a running VM directly (QEMU: a migration into a new process). For the
    others, ``Session.fork`` goes through a temporary checkpoint instead."""
    if client is not None and client.dead is not None:
        raise CheckpointError(f"the session's server is gone ({client.dead}); nothing to fork. "
                              f"Run a cell (it starts a fresh server), then fork again")
    if not backend.can_fork:
        raise CheckpointError(backend.no_checkpoints())
    with _held(client) as (_, release):
        return backend.fork(instance, release)


@contextlib.contextmanager
def _held(client: AgentClient | None) -> Iterator[tuple[dict, Callable[[], None]]]:
    """The agent held still: yields the hold's answer and a release to call as soon as the VM runs again
    (called on the way out too, once in all). No client, no agent: nothing to hold."""
    if client is None:
        yield {}, lambda: None
        return
    held = client.hold(HOLD_TIMEOUT_S)
    released = []

    def release() -> None:
        if not released:
            released.append(True)
            try:
                client.resume(HOLD_TIMEOUT_S)
            except AgentDied:
                pass  # the session finds out at its next cell, and says so

    try:
        yield held, release
    finally:
        release()


# -- what a session does with checkpoints (Session's methods of the same names call these) -----------

def check_start_from(session: "Session", name: str) -> None:
    """Refuse (saying why and what to do) a checkpoint the session's servers could not start from."""
    store.check_name(name)
    if not session.backend.can_checkpoint:
        raise CheckpointError(session.backend.no_checkpoints())
    session.backend.snapshot(name)  # a missing or incompatible checkpoint


def set_start_from(session: "Session", name: str | None) -> None:
    """Start every new server (and warm-pool VM) of ``session`` from checkpoint ``name`` (None: the base
    snapshot). Checked now; the running server is kept until the session is reset."""
    with session._lock:
        if name:
            check_start_from(session, name)
        session.backend_options["start_from"] = name or None
        if session._backend is not None:
            session._backend.start_from = name or None
        if session._pool is not None:  # warm VMs of the old start
            session._pool.close()
            session._pool = None


def _to_copy(session: "Session", what: str, then: str) -> Server:
    """The running server a checkpoint or fork copies (``what``: "checkpoint" or "fork"); the reasons
    there is none, each with its fix. Call with the session's lock held."""
    if session.mode == "per-cell":
        raise UsageError(f"in per-cell mode no server outlives its cell, so there is nothing to {what}. "
                         f"Switch: %config Dhvm.mode = 'per-session', run the cells, then {what}")
    if not session.backend.can_checkpoint:
        raise CheckpointError(session.backend.no_checkpoints())
    if session.server is None:
        raise CheckpointError(f"nothing to {what} yet: this session has no server. Run the cells that load "
                              f"your data, then: {then}")
    return session.server


def save_session(session: "Session", name: str, overwrite: bool = False, temporary: bool = False) -> store.Checkpoint:
    """Save the session's server as checkpoint ``name``; it runs on."""
    with session._lock:
        srv = _to_copy(session, "checkpoint", f"%dhvm checkpoint {name}")
        source = {"instance": srv.instance.id, "from_checkpoint": srv.checkpoint, "pid": os.getpid()}
        ck = save(session.backend, srv.instance, srv.client, name, overwrite, source, temporary)
        if srv.client.dead is not None and srv.instance.alive():
            # Firecracker resets every vsock connection of a VM it snapshots (listeners survive):
            # the server runs on, on a new connection; live views on the old one are over.
            session.stop_live(reason="the checkpoint reset the VM's connections")
            srv.client.close()
            srv.client = srv.instance.open_client(timeout=30)
            srv.client.hello(timeout=30)
        return ck


def restore_session(session: "Session", name: str) -> dict:
    """Replace the session's server with a fresh VM restored from checkpoint ``name`` (once: a later
    reset starts from ``start_from`` again). The old server is kept if the restore fails."""
    store.check_name(name)
    with session._lock:
        if session.mode == "per-cell":
            raise UsageError(f"per-cell mode starts every cell fresh: make them start from the checkpoint "
                             f"with %config Dhvm.start_from = '{name}'")
        if not session.backend.can_checkpoint:
            raise CheckpointError(session.backend.no_checkpoints())
        new = session._launch(name)
        if session.server is not None:
            session.stop_live(reason=f"the session was restored from checkpoint {name}")
            session.server.close()
        session.server = new
        return new.info


def fork_session(session: "Session", origin: str | None = None) -> "Session":
    """A new session (same backend and settings) whose server starts from this one's state now;
    ``origin``: what ``summary`` says it started from (default: fork of this session's instance)."""
    import secrets

    with session._lock:
        srv = _to_copy(session, "fork", "%dhvm fork NEW")
        child = session.sibling()
        origin = origin or f"fork of {srv.instance.id}"
        if session.backend.can_fork:  # a running VM copied into a new one (QEMU)
            child.adopt(start_server(child.backend, origin=origin, headroom_mb=session.memory_headroom_mb,
                                     make=lambda: fork(session.backend, srv.instance, srv.client)))
            return child
        name = f"fork-{secrets.token_hex(6)}"
        save_session(session, name, temporary=True)
        try:
            child.adopt(start_server(child.backend, checkpoint=name, origin=origin,
                                     headroom_mb=session.memory_headroom_mb))
        finally:
            # A running restore holds the memory file open; the name is no longer needed.
            store.remove(session.layout, name)
    return child
