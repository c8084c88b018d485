"""Saving a running session as a checkpoint: hold the agent still, let the backend save the VM, let it go.

The agent is held (``AgentClient.hold``) so that nothing is half sent in either direction while the
VM is saved: a VM restored from the checkpoint then starts on a clean stream, where its new host's
handshake is the first frame. The session that was saved carries on afterwards (``resume``); its
live views pause for the save and go on.

Where the files go and how they are checked is ``vm/checkpoint_store``; how a VM is saved is each
backend's ``checkpoint``.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Callable, Iterator

from .client import AgentClient
from .errors import AgentDied, CheckpointError
from .instances import proc_start_time
from .vm import Backend, Instance
from .vm import checkpoint_store as store

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
