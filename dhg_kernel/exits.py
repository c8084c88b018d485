"""Every session's servers end with the process: at exit, and on SIGTERM (whatever else happens, the
watchdog destroys a dead process's instances)."""

from __future__ import annotations

import atexit
import os
import signal
import threading
import weakref

# ``Session`` in annotations is session.py's: not imported, as session.py imports this module.
_sessions: "weakref.WeakSet[Session]" = weakref.WeakSet()


def track(session: "Session") -> None:
    """Stop ``session`` with the process."""
    _sessions.add(session)


def stop_all_sessions(wait: float | None = None) -> None:
    """Destroy every live session's instance (at exit and on SIGTERM).

    ``wait``: how long to wait for a session that is busy (starting a VM in another thread, say);
    past that, its instances are destroyed by their records, without the session's lock.
    """
    from .instances import destroy, list_instances

    for s in list(_sessions):
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
