"""VM backends: each starts (or restores) an instance and hands back a byte stream to its agent."""

from __future__ import annotations

from .base import Backend, BackendUnavailable, Instance


def get_backend(name: str, layout, **options) -> Backend:
    """The backend called ``name`` (``local`` for now; ``qemu`` and ``firecracker`` come with VMs)."""
    if name == "local":
        from .local import LocalBackend

        return LocalBackend(layout, **options)
    raise BackendUnavailable(f"unknown backend {name!r}; available here: local")


__all__ = ["Backend", "BackendUnavailable", "Instance", "get_backend"]
