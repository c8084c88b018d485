"""VM backends: each starts (or restores) an instance and hands back a byte stream to its agent."""

from __future__ import annotations

import importlib.util

from .base import Backend, BackendUnavailable, Instance

BACKENDS = ("firecracker", "qemu", "local")

_registered: dict = {}
"""Backends added by name with ``register_backend`` (tests' fake backend); never chosen by ``auto``."""


def register_backend(name: str, factory) -> None:
    """Make ``get_backend(name, layout, **options)`` return ``factory(layout, **options)`` (for tests)."""
    _registered[name] = factory


def get_backend(name: str, layout, **options) -> Backend:
    """The backend called ``name`` (``auto``: see ``choose_backend``)."""
    if name == "auto":
        name, _ = choose_backend(layout)
    if name in _registered:
        return _registered[name](layout, **options)
    if name == "local":
        from .local import LocalBackend

        return LocalBackend(layout, **options)
    if name == "qemu":
        from .qemu import QemuBackend

        return QemuBackend(layout, **options)
    if name == "firecracker":
        from .firecracker import FirecrackerBackend

        return FirecrackerBackend(layout, **options)
    raise BackendUnavailable(f"unknown backend {name!r}; choose one of: auto, {', '.join(BACKENDS)}")


def why_not(name: str, layout) -> str | None:
    """None when backend ``name`` can run here now, else the reason and the command that fixes it."""
    if name == "firecracker":
        from .firecracker import FirecrackerBackend

        # Every prerequisite (Linux, /dev/kvm, KVM_CREATE_VM, binary, kernel, snapshot) — first failure wins.
        return FirecrackerBackend(layout).why_not()
    if name == "qemu":
        from .qemu import QemuBackend

        try:
            backend = QemuBackend(layout)
            backend.binary()
            backend.snapshot()
        except BackendUnavailable as e:
            return str(e)
        return None
    if name == "local":
        if importlib.util.find_spec("deephaven_server") is None:
            return "deephaven-server is not installed on the host — run: pip install 'dhg_kernel[local]'"
        return None
    return f"unknown backend {name!r}"


def choose_backend(layout) -> tuple[str, dict[str, str]]:
    """``auto``: firecracker if it can run, else qemu, else local. Returns the choice and, for every
    backend passed over, why."""
    reasons: dict[str, str] = {}
    for name in BACKENDS:
        reason = why_not(name, layout)
        if reason is None:
            return name, reasons
        reasons[name] = reason
    raise BackendUnavailable("no backend can run here:\n" + "\n".join(f"  {k}: {v}" for k, v in reasons.items()))


__all__ = ["BACKENDS", "Backend", "BackendUnavailable", "Instance", "choose_backend", "get_backend", "register_backend", "why_not"]
