"""A notebook's sessions by name: ``main`` (cells without ``-s``) and the named ones (``%%dhvm -s NAME``,
``%dhvm fork NAME``). The magic and the kernel both find sessions here, so a completion in a
``%%dhvm -s b`` cell is answered by the same server that runs the cell.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING, Callable, Iterator

from .errors import UsageError

if TYPE_CHECKING:
    from .session import Session

MAIN = "main"


class Sessions:
    """Named sessions, made on first use by ``make``, and which one the running command is for."""

    def __init__(self, make: Callable[[], "Session"]):
        self._make = make
        self._by_name: dict[str, Session] = {}
        self.active = MAIN
        """The session the running cell or line command is for (``-s NAME``; else ``main``)."""

    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    def __len__(self) -> int:
        return len(self._by_name)

    def items(self):
        return list(self._by_name.items())

    def values(self):
        return list(self._by_name.values())

    def get(self, name: str) -> "Session | None":
        return self._by_name.get(name)

    def named(self, name: str) -> "Session":
        """The session called ``name``, made on first use."""
        if name not in self._by_name:
            self._by_name[name] = self._make()
        return self._by_name[name]

    @property
    def current(self) -> "Session":
        """The active session, made on first use."""
        return self.named(self.active)

    def existing(self, name: str | None) -> "Session | None":
        """The session called ``name`` (None or ``main``: main, made on first use), or None if there is no such one."""
        if name in (None, MAIN):
            return self.named(MAIN)
        return self._by_name.get(name)

    def require(self, name: str) -> None:
        """A line command asks about a session; only a cell (``%%dhvm -s NAME``) or a fork makes one."""
        if name != MAIN and name not in self._by_name:
            known = ", ".join(self._by_name) or "none yet"
            raise UsageError(f"no session named {name!r} in this notebook (sessions: {known}). A cell makes one: "
                             f"%%dhvm -s {name}, and %dhvm fork {name} makes one from this session")

    @contextmanager
    def using(self, name: str) -> Iterator[None]:
        """Make ``name`` the active session while the block runs."""
        from .vm.checkpoint_store import check_name

        if name != MAIN:
            check_name(name, "session")  # a session name follows the rules of checkpoint names
        outer, self.active = self.active, name
        try:
            yield
        finally:
            self.active = outer

    def put(self, name: str, session: "Session") -> None:
        """Name ``session`` ``name``; a session that had the name before is stopped."""
        old = self._by_name.pop(name, None)
        if old is not None and old is not session:
            old.stop()
        self._by_name[name] = session

    def stop(self, name: str) -> bool:
        """Stop and forget session ``name``; False if there was none."""
        session = self._by_name.pop(name, None)
        if session is not None:
            session.stop()
        return session is not None

    def close(self) -> None:
        """Stop every session."""
        sessions, self._by_name = list(self._by_name.values()), {}
        for session in sessions:
            session.stop()
