"""Defaults and paths: one copy of every limit, extension list and directory layout."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DH_VERSION = "42.7"
DEFAULT_MAX_ROWS = 1000
DEFAULT_MAX_PUSH_MB = 50.0
DEFAULT_TIMEOUT_S = 0.0  # 0: no limit
DEFAULT_BACKEND = "auto"  # firecracker if it can run, else qemu (with a prepared snapshot), else local
DEFAULT_MODE = "per-session"
DEFAULT_DTYPE_BACKEND = "numpy_nullable"
DATA_EXTENSIONS = (".csv", ".tsv", ".json", ".jsonl", ".parquet", ".arrow", ".txt", ".xml", ".yaml", ".yml", ".py")
# How long an agent may take from process start to answering (a cold JVM + Deephaven start).
AGENT_START_TIMEOUT_S = 180.0
# How long a cancelled cell may take to stop before its VM is declared stuck and replaced.
CANCEL_GRACE_S = 2.0
# How long a completion or inspection may take before its answer is dropped (the VM is kept).
QUESTION_DEADLINE_S = 3.0
# How often a VM gets the host's wall clock while a session lives (its own clock drifts under emulation).
CLOCK_NOTICE_S = 1.0


def default_backend() -> str:
    """``$DHG_BACKEND`` or ``auto``."""
    return os.environ.get("DHG_BACKEND") or DEFAULT_BACKEND


def default_mode() -> str:
    """``$DHG_MODE`` or ``per-session``."""
    return os.environ.get("DHG_MODE") or DEFAULT_MODE


def dhg_home(override: str | os.PathLike | None = None) -> Path:
    """``--config-dir`` wins, then ``$DHG_HOME``, then ``~/.dhg``."""
    if override:
        return Path(override).expanduser().resolve()
    env = os.environ.get("DHG_HOME")
    if env:
        return Path(env).expanduser().resolve()
    return Path.home() / ".dhg"


@dataclass(frozen=True)
class Layout:
    """Where artifacts live under ``DHG_HOME`` (see DESIGN.md)."""

    home: Path

    @classmethod
    def resolve(cls, override: str | os.PathLike | None = None) -> "Layout":
        return cls(dhg_home(override))

    @property
    def vm(self) -> Path:
        return self.home / "vm"

    @property
    def run(self) -> Path:
        """Per-instance directories: ``run/<instance>/`` with instance.json, sockets, logs."""
        return self.vm / "run"

    @property
    def cache(self) -> Path:
        """Things built on the host and reused across instances (the agent's compiled Java classes)."""
        return self.home / "cache"

    def snapshots(self, dh_version: str = DH_VERSION) -> Path:
        return self.vm / "snapshots" / dh_version
