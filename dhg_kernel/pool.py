"""A warm pool: instances started (restored) in the background so that a per-cell VM is ready
before the user runs the next cell."""

from __future__ import annotations

import threading
from typing import Callable, Generic, Protocol, TypeVar


class _Closable(Protocol):
    def close(self) -> None: ...


T = TypeVar("T", bound=_Closable)


class WarmPool(Generic[T]):
    """Keeps up to ``size`` ready instances made by ``launch``; ``take`` hands one over and refills."""

    def __init__(self, launch: Callable[[], T], size: int = 1):
        self._launch = launch
        self.size = max(0, size)
        self._ready: list[T] = []
        self._starting = 0
        self._closed = False
        self._cond = threading.Condition()
        self.last_error: BaseException | None = None
        self.taken = 0
        self.taken_warm = 0

    def fill(self) -> None:
        """Start background launches until ``size`` instances are ready or on their way."""
        with self._cond:
            while not self._closed and len(self._ready) + self._starting < self.size:
                self._starting += 1
                threading.Thread(target=self._launch_one, name="dhvm-warm-pool", daemon=True).start()

    def _launch_one(self) -> None:
        item: T | None = None
        try:
            item = self._launch()
        except BaseException as e:  # noqa: BLE001 - remembered; take() launches in the foreground then
            self.last_error = e
        with self._cond:
            if item is not None and not self._closed:
                self._ready.append(item)
                item = None
        if item is not None:
            item.close()  # the pool was closed while this one started
        with self._cond:
            self._starting -= 1  # only now, so close() can wait until nothing is left running
            self._cond.notify_all()

    def take(self) -> T:
        """A ready instance: a warm one, one about to be ready, or a new one started now."""
        with self._cond:
            self.taken += 1
            while not self._ready and self._starting and self.last_error is None:
                self._cond.wait()
            item = self._ready.pop(0) if self._ready else None
            self.last_error = None
        if item is not None:
            self.taken_warm += 1
        else:
            item = self._launch()
        self.fill()
        return item

    def peek(self) -> T | None:
        """A ready instance without taking it (for read-only questions), or None."""
        with self._cond:
            return self._ready[0] if self._ready else None

    def close(self, wait: float = 60.0) -> None:
        """Destroy the ready instances, and those still starting once they arrive (waiting up to
        ``wait`` seconds for them, so that nothing outlives the pool)."""
        with self._cond:
            self._closed = True
            ready, self._ready = self._ready, []
        for item in ready:
            item.close()
        with self._cond:
            self._cond.wait_for(lambda: self._starting == 0, timeout=wait)

    def describe(self) -> dict:
        with self._cond:
            return {"size": self.size, "ready": len(self._ready), "starting": self._starting,
                    "cells": self.taken, "served_warm": self.taken_warm}
