"""The phase runner of ``dhvm prepare``: each phase runs only when the checksum of its inputs changed
(or its outputs are missing), logs to prepare.log, and fails with a PrepareError that names it."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Callable

from ..config import Layout
from ..errors import PrepareError

Progress = Callable[[str], None]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def input_key(*parts) -> str:
    """A checksum of a phase's inputs (anything JSON-serialisable)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


class PhaseRunner:
    """One prepare run: the log, the phase checksums (``layout.prepare_state``), progress output.

    ``keys`` holds each phase's input checksum (later phases build theirs from earlier ones);
    ``inputs`` what the snapshot metadata records about the inputs (mirror, wheels, kernel).
    """

    def __init__(self, layout: Layout, rebuild: bool, progress: Progress, log_path: Path):
        self.layout = layout
        self.rebuild = rebuild
        self.progress = progress
        self.log_path = log_path
        self.root = os.geteuid() == 0
        self.timings: dict[str, float] = {}
        self.keys: dict[str, str] = {}
        self.inputs: dict[str, object] = {}
        try:
            self.state = json.loads(layout.prepare_state.read_text())
        except (OSError, ValueError):
            self.state = {}

    def log(self, msg: str) -> None:
        with open(self.log_path, "a") as fh:
            fh.write(f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {msg}\n")

    def run(self, phase: str, cmd: list[str], hint: str, **kw) -> None:
        """Run a command with its output appended to the log; failure raises PrepareError."""
        self.log(f"$ {' '.join(cmd)}")
        with open(self.log_path, "ab") as fh:
            r = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, **kw)
        if r.returncode:
            raise PrepareError(phase, f"`{' '.join(cmd[:3])} …` exited with status {r.returncode}", self.log_path, hint)

    def fail(self, phase: str, why: str, hint: str) -> PrepareError:
        """The error to raise when ``phase`` cannot go on (``hint``: the command that fixes it)."""
        return PrepareError(phase, why, self.log_path, hint)

    def need_root(self, phase: str) -> None:
        if not self.root:
            raise self.fail(phase, "installing into the guest tree uses chroot, which needs root",
                            "run as root: sudo dhvm prepare (an unprivileged build is not supported yet)")

    def up_to_date(self, phase: str, key: str, *outputs: Path) -> bool:
        return (not self.rebuild and self.state.get(phase, {}).get("key") == key
                and all(p.exists() for p in outputs))

    def _done(self, phase: str, key: str, seconds: float) -> None:
        self.state[phase] = {"key": key, "seconds": round(seconds, 1), "at": time.time()}
        tmp = self.layout.prepare_state.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state, indent=2))
        os.replace(tmp, self.layout.prepare_state)

    def phase(self, name: str, key: str, outputs: tuple[Path, ...], build: Callable[[], None]) -> bool:
        """Run ``build`` unless the phase's inputs are unchanged and its outputs exist; True if it ran."""
        self.keys[name] = key
        if self.up_to_date(name, key, *outputs):
            self.progress(f"{name:9s} up to date")
            self.timings[name] = 0.0
            return False
        self.progress(f"{name:9s} building…")
        self.log(f"=== phase {name} (key {key})")
        t0 = time.monotonic()
        self.state.pop(name, None)  # a failed build must not look up to date next time
        try:
            build()
        except PrepareError:
            raise
        except Exception as e:  # noqa: BLE001 - every failure names its phase
            self.log(f"phase {name} failed: {e!r}")
            raise self.fail(name, f"{type(e).__name__}: {e}", "fix the cause above, then run: dhvm prepare") from e
        secs = time.monotonic() - t0
        self.timings[name] = round(secs, 1)
        self._done(name, key, secs)
        self.progress(f"{name:9s} done in {secs:.1f}s")
        return True
