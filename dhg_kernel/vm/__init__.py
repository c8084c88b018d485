"""VM backends: each starts (or restores) an instance and hands back a byte stream to its agent."""

from __future__ import annotations

import importlib.util
import inspect

from .base import Backend, BackendUnavailable, Instance
from ..errors import UsageError

BACKENDS = ("firecracker", "qemu", "local")

OPTIONS = frozenset({
    "dh_version", "heap", "start_from", "restore_timeout",  # every snapshot backend
    "python", "start_timeout",  # local
    "accel", "qemu",  # qemu
    "firecracker", "jailer", "jailer_uid", "jailer_gid", "network", "netns_parent",  # firecracker
})
"""Every option a backend takes. A backend ignores the options only another one takes (``auto`` may pick
either), so ``check_options`` refuses a name none takes: a misspelt option would otherwise vanish."""
RENAMED = {"snapshot": "start_from"}

_registered: dict = {}
"""Backends added by name with ``register_backend`` (tests' fake backend); never chosen by ``auto``."""
_registered_options: set[str] = set()


def register_backend(name: str, factory) -> None:
    """Make ``get_backend(name, layout, **options)`` return ``factory(layout, **options)`` (for tests)."""
    _registered[name] = factory
    _registered_options.update(constructor_options(factory))


def constructor_options(factory) -> set[str]:
    """The options ``factory(layout, **options)`` takes by name."""
    params = list(inspect.signature(factory).parameters.values())[1:]
    return {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def check_options(options) -> None:
    """Refuse an option no backend takes, naming the ones that exist (and an old name's new one)."""
    unknown = sorted(set(options) - OPTIONS - _registered_options)
    if unknown:
        hints = [f"{u} is now {RENAMED[u]}" for u in unknown if u in RENAMED]
        raise UsageError(f"unknown backend option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}"
                         + (f" ({'; '.join(hints)})" if hints else "")
                         + f"; the options are: {', '.join(sorted(OPTIONS | _registered_options))}")


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
