"""The provisioner of the installed "Deephaven microVM" kernelspec (entry point ``dhvm-local-provisioner``):
jupyter_client's ``LocalProvisioner``, with the kernel's ZMQ channels on unix sockets in a 0700 directory
of the owner's instead of TCP on 127.0.0.1.

Over TCP any local user can connect to a kernel's iopub and read every output (the messages are signed,
not encrypted). A unix socket in a directory only its owner can search cannot even be connected to by
another uid. IPC is a transport jupyter_client, ipykernel, nbclient and jupyter_server (JupyterLab) all
support end to end, with no keys to distribute, so it is chosen over CurveZMQ (which jupyter_client has
only since 8.10 and which would still leave the sockets reachable).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from jupyter_client.provisioning import LocalProvisioner

from .errors import UsageError

PROVISIONER_NAME = "dhvm-local-provisioner"
# sun_path is 108 bytes on Linux; ZMQ's ipc endpoints are "<ip>-<n>", so leave room for the suffix.
MAX_SOCKET_PATH = 100
SOCKET_PREFIX = "kernel"


def socket_parent() -> str | None:
    """Where the private socket directories go: ``$XDG_RUNTIME_DIR`` (per-user, 0700) if it is usable,
    else the temp dir (``$TMPDIR``, /tmp; mkdtemp makes the directory 0700 itself)."""
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isdir(xdg) and os.access(xdg, os.W_OK | os.X_OK):
        return xdg
    return None


def private_socket_dir() -> Path:
    """A fresh directory only this uid can search (0700), short enough for unix socket paths."""
    d = Path(tempfile.mkdtemp(prefix="dhvm-kernel-", dir=socket_parent()))
    os.chmod(d, 0o700)  # mkdtemp's mode already; said again so no umask or ACL default can widen it
    if len(str(d / SOCKET_PREFIX)) + 3 > MAX_SOCKET_PATH:
        shutil.rmtree(d, ignore_errors=True)
        raise UsageError(f"the kernel's socket directory {d} makes unix socket paths longer than "
                         f"{MAX_SOCKET_PATH} bytes; set TMPDIR to a short directory (export TMPDIR=/tmp) and "
                         f"start the kernel again")
    return d


class DhvmLocalProvisioner(LocalProvisioner):
    """``LocalProvisioner`` whose kernels listen on unix sockets in a private (0700) directory, removed
    when the kernel is shut down (a restart keeps it, and with it the kernel's address)."""

    socket_dir: Path | None = None

    async def pre_launch(self, **kwargs: Any) -> dict[str, Any]:
        km = self.parent
        if km is not None:
            if self.socket_dir is None or not self.socket_dir.is_dir():
                self.socket_dir = private_socket_dir()
            km.transport = "ipc"
            km.ip = str(self.socket_dir / SOCKET_PREFIX)
            km.cache_ports = False  # TCP ports only; with ipc the "ports" are socket file suffixes
        return await super().pre_launch(**kwargs)

    async def cleanup(self, restart: bool = False) -> None:
        await super().cleanup(restart=restart)
        if not restart and self.socket_dir is not None:
            shutil.rmtree(self.socket_dir, ignore_errors=True)
            self.socket_dir = None

    async def get_provisioner_info(self) -> dict:
        info = await super().get_provisioner_info()
        info["socket_dir"] = str(self.socket_dir) if self.socket_dir else None
        return info

    async def load_provisioner_info(self, provisioner_info: dict) -> None:
        await super().load_provisioner_info(provisioner_info)
        d = provisioner_info.get("socket_dir")
        self.socket_dir = Path(d) if d else None
