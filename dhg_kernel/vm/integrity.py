"""What a saved checkpoint's files must still be: their sizes and digests, recorded at save, checked
before any VMM sees them.

Small files (the device state, KBs to a few MB) are hashed whole, at save and at every check. The
memory file is GBs: a full SHA-256 of it costs seconds (about 1 GB/s here, holes included) and
a restore takes under one, so it is checked by its exact size (a short file is what QEMU would
silently extend with zeros) and by a SHA-256 of ``SAMPLE_PAGES`` pages spread over the parts of the
file that hold data (their offsets are recorded, so the check reads ~1 MiB whatever the copy's holes).
"""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path

# Files up to this size are hashed whole (a checkpoint's device state; its memory file is far bigger).
FULL_HASH_MAX_BYTES = 64 * 2**20
# How many pages of a big file the sampled digest reads (256 x 4 KiB = 1 MiB per check).
SAMPLE_PAGES = 256
PAGE = 4096


def fingerprint(path: Path) -> dict:
    """What ``check`` later compares: the size, and a whole or sampled SHA-256 (see the module)."""
    size = path.stat().st_size
    fd = os.open(path, os.O_RDONLY)
    try:
        if size <= FULL_HASH_MAX_BYTES:
            return {"bytes": size, "sha256": _sha256_whole(fd)}
        offsets = _sample_offsets(fd, size)
        return {"bytes": size, "sample_offsets": offsets, "sample_sha256": _sha256_pages(fd, offsets)}
    finally:
        os.close(fd)


def check(path: Path, want: dict) -> str | None:
    """None when ``path`` still matches its fingerprint ``want``; else what is wrong, in words."""
    name = path.name
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return f"{name} is missing"
    expected = want.get("bytes")
    if expected is not None and size != expected:
        how = "cut short" if size < expected else "grown"
        return f"{name} is {size} bytes, expected {expected} ({how} since it was saved)"
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        return f"{name} cannot be read ({e.strerror})"
    try:
        if "sha256" in want and _sha256_whole(fd) != want["sha256"]:
            return f"{name}'s content changed since it was saved (its SHA-256 differs)"
        if "sample_sha256" in want and _sha256_pages(fd, want.get("sample_offsets") or []) != want["sample_sha256"]:
            return f"{name}'s content changed since it was saved (the SHA-256 of {SAMPLE_PAGES} sampled pages differs)"
    except OSError as e:
        return f"{name} cannot be read ({e.strerror})"
    finally:
        os.close(fd)
    return None


def _sha256_whole(fd: int) -> str:
    h = hashlib.sha256()
    offset = 0
    while chunk := os.pread(fd, 2**20, offset):
        h.update(chunk)
        offset += len(chunk)
    return h.hexdigest()


def _sha256_pages(fd: int, offsets: list[int]) -> str:
    h = hashlib.sha256()
    for off in offsets:
        h.update(os.pread(fd, PAGE, off))
    return h.hexdigest()


def _data_extents(fd: int, size: int) -> list[tuple[int, int]]:
    """(start, end) of each stretch that holds data; the whole file where SEEK_DATA is not supported."""
    out, pos = [], 0
    try:
        while pos < size:
            start = os.lseek(fd, pos, os.SEEK_DATA)
            end = os.lseek(fd, start, os.SEEK_HOLE)
            out.append((start, min(end, size)))
            pos = end
    except OSError as e:
        if e.errno != errno.ENXIO:  # ENXIO: no data after pos
            return [(0, size)]
    return out or [(0, size)]


def _sample_offsets(fd: int, size: int) -> list[int]:
    """``SAMPLE_PAGES`` page offsets spread evenly over the file's data (holes read as zeros anyway)."""
    extents = _data_extents(fd, size)
    total = sum(b - a for a, b in extents)
    picks: list[int] = []
    for k in range(SAMPLE_PAGES):
        at = total * k // SAMPLE_PAGES  # the k-th point along the data, then found in its extent
        for a, b in extents:
            if at < b - a:
                picks.append((a + at) // PAGE * PAGE)
                break
            at -= b - a
    return sorted(set(picks))
