"""Installing the "Deephaven microVM" kernelspec (kernel name ``dhvm``) for Jupyter."""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from importlib import resources
from pathlib import Path

from .errors import UsageError

KERNEL_NAME = "dhvm"


def spec_files() -> Path:
    """The packaged kernelspec directory (``kernelspec/`` in the source tree)."""
    return Path(str(resources.files("dhg_kernel.kernelspec_data")))


def install(user: bool = False, prefix: str | None = None, python: str | None = None) -> str:
    """Install the kernelspec; returns the directory it went to.

    Default: the current environment (``sys.prefix``), like ``--sys-prefix``.
    """
    from jupyter_client.kernelspec import KernelSpecManager

    from .local_provisioner import PROVISIONER_NAME

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / KERNEL_NAME
        src.mkdir()
        for f in spec_files().iterdir():
            if f.suffix in (".json", ".png"):
                shutil.copy(f, src / f.name)
        spec = json.loads((src / "kernel.json").read_text())
        spec["argv"][0] = python or sys.executable  # the kernel runs with the Python that installed it
        # Its channels on unix sockets in a 0700 dir: over TCP any local user could read every output.
        spec["metadata"]["kernel_provisioner"] = {"provisioner_name": PROVISIONER_NAME}
        (src / "kernel.json").write_text(json.dumps(spec, indent=1))
        if not user and prefix is None:
            prefix = sys.prefix
        return KernelSpecManager().install_kernel_spec(str(src), KERNEL_NAME, user=user, prefix=prefix)


def uninstall(name: str = KERNEL_NAME) -> str:
    """Remove the kernelspec ``name`` (wherever Jupyter finds it); returns the directory removed."""
    from jupyter_client.kernelspec import KernelSpecManager

    ksm = KernelSpecManager()
    path = ksm.find_kernel_specs().get(name)
    if path is None:
        raise UsageError(f"no '{name}' kernelspec is installed (see: jupyter kernelspec list); "
                         f"to install it: dhvm kernel install")
    ksm.remove_kernel_spec(name)
    return path


def add_location_args(ap) -> None:
    where = ap.add_mutually_exclusive_group()
    where.add_argument("--user", action="store_true", help="install for the current user")
    where.add_argument("--sys-prefix", action="store_true", help="install into this Python environment (default)")
    where.add_argument("--prefix", help="install under this prefix (share/jupyter/kernels)")


def run(args) -> int:
    if args.action == "install":
        path = install(user=args.user, prefix=args.prefix)
        print(f"installed kernelspec '{KERNEL_NAME}' (Deephaven microVM) in {path}")
    else:
        print(f"removed kernelspec '{KERNEL_NAME}' from {uninstall()}")
    return 0
