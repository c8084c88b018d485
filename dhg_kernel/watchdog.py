"""Ends a process's instances within moments of its death, however it dies (kill -9 included).

One small helper per owner process and DHG_HOME. It holds the read end of a pipe whose write end
only the owner holds (non-inheritable, so no VM or agent keeps it open). When the owner dies the
kernel closes that end; the helper reads end-of-file and destroys every instance the owner
recorded, then exits. It runs in its own session, so a signal to the owner's process group (as
Jupyter sends when it kills a kernel) does not take it down before it has cleaned up.
Started by ``instances.ensure_watchdog`` (from ``new_instance``) as ``python -m dhg_kernel.watchdog``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from .config import Layout
from .instances import reap_owner

def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="destroy a process's dhg instances when it dies")
    ap.add_argument("--home", required=True)
    ap.add_argument("--owner", type=int, required=True)
    args = ap.parse_args(argv)
    while True:
        try:
            if not os.read(0, 4096):
                break  # the owner is gone (its end of the pipe closed with it)
        except InterruptedError:
            continue
        except OSError:
            break
    reap_owner(Layout(Path(args.home)), args.owner)


if __name__ == "__main__":
    main()
