"""What checking a checkpoint's memory file costs: the sampled digest a save records and every
listing and restore checks (``vm/integrity``), against one full SHA-256 of the file.

Usage::

    python bench/bench_checkpoint_integrity.py [FILE] [--config-dir ~/.dhg]

FILE defaults to the QEMU base snapshot's ``mem`` under the config dir (GBs, sparse). The file is only
read. Figures are printed, not asserted; a second run reads from the page cache.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dhg_kernel.config import DH_VERSION, Layout  # noqa: E402
from dhg_kernel.vm import integrity  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("file", nargs="?", type=Path)
    ap.add_argument("--config-dir", default="~/.dhg")
    args = ap.parse_args()
    path = args.file or Layout(Path(args.config_dir).expanduser()).snapshots(DH_VERSION) / "mem"
    st = path.stat()
    print(f"{path}: {st.st_size / 2**30:.2f} GiB, {st.st_blocks * 512 / 2**30:.2f} GiB on disk")
    t0 = time.perf_counter()
    fp = integrity.fingerprint(path)
    t1 = time.perf_counter()
    assert integrity.check(path, fp) is None
    t2 = time.perf_counter()
    print(f"sampled digest ({len(fp.get('sample_offsets', []))} pages): at save {1000 * (t1 - t0):.1f} ms, "
          f"check {1000 * (t2 - t1):.1f} ms")
    h, fd, offset = hashlib.sha256(), os.open(path, os.O_RDONLY), 0
    try:
        while chunk := os.pread(fd, 8 * 2**20, offset):
            h.update(chunk)
            offset += len(chunk)
    finally:
        os.close(fd)
    t3 = time.perf_counter()
    print(f"full SHA-256: {t3 - t2:.2f} s ({offset / 2**20 / (t3 - t2):.0f} MiB/s)")


if __name__ == "__main__":
    main()
