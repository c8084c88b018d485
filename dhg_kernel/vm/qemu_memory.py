"""Copying a saving QEMU's RAM (a memfd) into a checkpoint's ``mem`` file: only the non-zero pages, the rest
left as holes."""

from __future__ import annotations

import os
import time
from pathlib import Path

from .qmp import QMPCommandError
from .qemu_machine import MEMFD_BACKEND


class _open_memfd:
    """The memfd holding a QEMU process's RAM (``MEMFD_BACKEND``), opened through /proc (it outlives the process)."""

    def __init__(self, pid: int):
        self.pid = pid
        self.fd = -1

    def __enter__(self) -> int:
        fds = Path(f"/proc/{self.pid}/fd")
        for entry in fds.iterdir():
            try:
                target = os.readlink(entry)
            except OSError:
                continue
            if target.startswith(f"/memfd:{MEMFD_BACKEND}"):
                self.fd = os.open(entry, os.O_RDONLY)
                return self.fd
        raise QMPCommandError("checkpoint", f"no {MEMFD_BACKEND} among the saving QEMU's files")

    def __exit__(self, *exc) -> None:
        if self.fd >= 0:
            os.close(self.fd)


def copy_sparse(src_fd: int, dest: Path, window: int = 256 * 2**20) -> float:
    """Copy the non-zero pages of ``src_fd`` (a VM's RAM) into a new file ``dest`` at the same offsets,
    leaving the rest holes, and fsync it; returns the seconds taken.

    A memfd that QEMU's incoming migration wrote is populated all through (QEMU reads each page to
    see whether it is already zero, and a read of a shared memfd allocates), so holes are found by
    looking: numpy looks for a non-zero word in each page, and runs of non-zero pages go by sendfile
    (an in-kernel copy: copy_file_range refuses to cross from tmpfs to another filesystem).
    """
    import mmap

    import numpy as np

    t0 = time.perf_counter()
    size = os.fstat(src_fd).st_size
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    mm = mmap.mmap(src_fd, size, prot=mmap.PROT_READ) if size else None
    try:
        os.ftruncate(fd, size)
        for lo, hi in _data_ranges(src_fd, size):
            for w in range(lo, hi, window):
                n = min(window, hi - w) // PAGE
                pages = np.frombuffer(mm, dtype=np.uint64, count=n * PAGE // 8, offset=w).reshape(n, PAGE // 8)
                nonzero = pages.max(axis=1) != 0  # max: faster than any() here (0.28 s against 0.47 s for 2.5 GiB)
                edges = np.flatnonzero(np.diff(np.concatenate(([0], nonzero.view(np.int8), [0]))))
                del pages  # no view of the map may outlive it
                for a, b in zip(edges[::2].tolist(), edges[1::2].tolist()):
                    _send(fd, src_fd, w + a * PAGE, (b - a) * PAGE)
        os.fsync(fd)
    finally:
        if mm is not None:
            mm.close()
        os.close(fd)
    return time.perf_counter() - t0


PAGE = 4096


def _data_ranges(fd: int, size: int):
    """(start, end) of each stretch of ``fd`` that holds data (a hole needs no look)."""
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:  # ENXIO: nothing after pos
            return
        end = os.lseek(fd, start, os.SEEK_HOLE)
        yield start - start % PAGE, min(size, end + (-end) % PAGE)
        pos = end


def _send(dst: int, src: int, offset: int, count: int) -> None:
    """Copy ``count`` bytes at ``offset`` of ``src`` to the same offset of ``dst``, in the kernel."""
    os.lseek(dst, offset, os.SEEK_SET)
    while count > 0:
        n = os.sendfile(dst, src, offset, count)
        if n <= 0:
            raise OSError(f"sendfile copied nothing at offset {offset}")
        offset, count = offset + n, count - n

