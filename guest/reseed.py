"""After a snapshot restore: the host's wall clock, fresh entropy and this clone's own login key.

Every clone of one snapshot wakes with the snapshot's clock, the same kernel and language random
state and no login key; ``after_restore`` gives it its own. ``Clock`` also keeps a VM's clock on the
host's between restores (emulated guests lose ticks).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import struct
import threading
import time
from typing import TYPE_CHECKING

from .common import ms

if TYPE_CHECKING:
    from .server import Deephaven

# A VM's clock is stepped to the host's when it is further off than this (see Clock).
CLOCK_TOLERANCE_NS = 10_000_000
_RNDADDENTROPY = 0x40085203  # _IOW('R', 0x03, int[2])
_RNDRESEEDCRNG = 0x5207  # _IO('R', 0x07)


class Clock:
    """Keeps a VM's wall clock on the host's.

    Under emulation the guest's clocksource loses ticks whenever the host is busy (20 s behind after
    ten loaded minutes was measured), so the host's time travels with every request and with a
    periodic notice; when the guest is further off than CLOCK_TOLERANCE_NS it is stepped (a frame's
    transit is well under that). Only in a VM (``--sync-clock``): a local agent shares the host's clock.
    """

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.steps = 0
        self.last_skew_ns = 0
        self.max_skew_ns = 0
        self._lock = threading.Lock()

    def observe(self, host_ns) -> dict:
        """Compare with the host's ``host_ns`` (sent a moment ago) and step the clock if needed."""
        out: dict = {}
        if not isinstance(host_ns, int):
            return out
        with self._lock:
            skew = host_ns - time.time_ns()
            self.last_skew_ns = skew
            self.max_skew_ns = max(self.max_skew_ns, abs(skew))
            out["clock_skew_ms"] = round(skew / 1e6, 3)
            if self.enabled and abs(skew) > CLOCK_TOLERANCE_NS:
                try:
                    time.clock_settime_ns(time.CLOCK_REALTIME, time.time_ns() + skew)
                    self.steps += 1
                    out["clock_set"] = True
                except OSError as e:  # setting needs root (the VM's agent is)
                    out["clock_set"] = False
                    out["clock_error"] = str(e)
        return out

    def describe(self) -> dict:
        return {"clock_sync": self.enabled, "clock_steps": self.steps,
                "clock_last_skew_ms": round(self.last_skew_ns / 1e6, 3),
                "clock_max_skew_ms": round(self.max_skew_ns / 1e6, 3)}


def after_restore(header: dict, payloads: list, dh: "Deephaven | None" = None, clock: Clock | None = None) -> dict:
    """After a snapshot restore: take the host's wall clock, entropy and this VM's login key, so
    clones of one snapshot neither live in the past, nor draw the same random numbers, nor share a key."""
    out: dict = {}
    host_ns = header.get("time_ns")
    if host_ns is not None:
        out.update((clock or Clock(enabled=True)).observe(host_ns))
    host_entropy = bytes(payloads[0]) if payloads else b""
    if host_entropy:
        out.update(_mix_kernel_entropy(host_entropy))
    # Seed from the host's bytes as well as the kernel: even if the guest kernel's generator was not
    # reseeded yet, clones must not share random streams.
    seed = int.from_bytes(hashlib.sha512(host_entropy + os.urandom(32)).digest(), "big")
    import random

    random.seed(seed)
    try:
        import numpy

        numpy.random.seed(seed % 2**32)
    except ImportError:
        pass
    if dh is not None:
        t0 = time.perf_counter()
        try:
            out["java_threads_reseeded"] = reseed_java(seed)
        except Exception as e:  # noqa: BLE001 - reported to the host, which shows it in status
            out["java_reseed_error"] = f"{type(e).__name__}: {e}"
        out["java_reseed_ms"] = ms(t0)
        key = header.get("key")
        if key:
            dh.set_key(key)
        out["key_set"] = dh.has_key
    out["time_ns"] = time.time_ns()
    return out


def reseed_java(seed: int) -> int:
    """Fresh Java random state (ThreadLocalRandom in every thread, Math.random, new Random) from ``seed``."""
    import jpy

    return int(jpy.get_type("dhg.Reseed").reseed(seed % 2**64 - 2**63))  # a signed Java long


def _mix_kernel_entropy(data: bytes) -> dict:
    """Credit host entropy to the guest kernel and force its generator to reseed now.

    A plain write to /dev/urandom only mixes the pool: clones restored from one snapshot would go on
    reading identical bytes until the next scheduled reseed. The ioctls need root (the VM's agent is).
    """
    out: dict = {"entropy_bytes": len(data)}
    try:
        fd = os.open("/dev/urandom", os.O_WRONLY)
        try:
            words = len(data) // 4
            info = struct.pack("ii", words * 32, words * 4) + data[: words * 4]
            fcntl.ioctl(fd, _RNDADDENTROPY, info)
            fcntl.ioctl(fd, _RNDRESEEDCRNG)
            out["kernel_reseeded"] = True
        finally:
            os.close(fd)
    except OSError as e:  # not root (local backend): the kernel is the host's own, already unique
        out["kernel_reseeded"] = False
        out["entropy_note"] = str(e)
    return out
