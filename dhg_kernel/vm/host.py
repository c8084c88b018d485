"""What this host can do for VMs: is /dev/kvm usable, can it boot a guest, which accelerator to use.

``/dev/kvm`` being there proves little: on some hosts (this project's CI machines among them) KVM
creates VMs but cannot run a Linux guest. So the answer that counts comes from a probe boot of the
guest kernel under KVM, capped in time, whose result is cached per QEMU version and kernel.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import platform
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..config import Layout

# ioctls of /dev/kvm (linux/kvm.h: _IO(KVMIO=0xAE, n)).
KVM_GET_API_VERSION = 0xAE00
KVM_CREATE_VM = 0xAE01
KVM_API_VERSION = 12
# A kernel under a working KVM reaches its root-mount panic in well under a second; this caps a stuck one.
PROBE_TIMEOUT_S = 20.0


@dataclass
class Check:
    """One prerequisite: its name, whether it holds, what was found, and what fixes it."""

    name: str
    ok: bool
    detail: str
    fix: str = ""

    def __str__(self) -> str:
        return self.detail + (f" — {self.fix}" if self.fix and not self.ok else "")


def kvm_usable() -> bool:
    """/dev/kvm exists and this user may open it read-write."""
    return os.access("/dev/kvm", os.R_OK | os.W_OK)


def kvm_create_vm(path: str = "/dev/kvm") -> tuple[bool, str]:
    """Open /dev/kvm and create (then drop) a VM: proves the module answers, not that a guest boots."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        return False, f"cannot open {path}: {e.strerror}"
    try:
        api = fcntl.ioctl(fd, KVM_GET_API_VERSION, 0)
        if api != KVM_API_VERSION:
            return False, f"{path} speaks KVM API {api}, not {KVM_API_VERSION}"
        vm = fcntl.ioctl(fd, KVM_CREATE_VM, 0)
        os.close(vm)
        return True, f"{path}: KVM_CREATE_VM ok"
    except OSError as e:
        return False, f"KVM_CREATE_VM on {path} failed: {e.strerror}"
    finally:
        os.close(fd)


def probe_kvm(qemu: str, kernel: Path, log: Callable[[str], None],
              timeout: float = PROBE_TIMEOUT_S) -> tuple[bool, str]:
    """Boot the guest kernel under KVM with no root disk: success is reaching the VFS mount panic.
    Returns (ok, what happened: the guest's or QEMU's last words)."""
    if not kvm_usable():
        log("kvm probe: /dev/kvm is not accessible")
        return False, "/dev/kvm is not accessible"
    timed_out = False
    cmd = [qemu, "-nodefaults", "-no-user-config", "-nographic", "-no-reboot", "-machine", "microvm,acpi=on",
           "-accel", "kvm", "-cpu", "host", "-m", "256M", "-kernel", str(kernel),
           "-append", "console=ttyS0 panic=-1", "-serial", "stdio"]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        out = r.stdout + r.stderr
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        timed_out = True
    ok = "VFS: Unable to mount root" in out or "Kernel panic - not syncing: VFS" in out
    last = [line.strip() for line in out.strip().splitlines() if line.strip()][-2:]
    if ok:
        detail = "the guest kernel reached its root-mount panic, as it should"
    else:
        detail = (f"the guest kernel did not reach its root-mount panic within {timeout:.0f}s" if timed_out
                  else "the probe VM ended early")
        detail += (f"; its last output: {' | '.join(last)[:300]}" if last else "; it printed nothing")
        detail += ", where a working KVM gets there in well under a second"
    log(f"kvm probe: {'ok' if ok else 'failed'}: {detail}")
    return ok, detail


def probed_accel(layout: Layout) -> str | None:
    """The cached result ("kvm"/"tcg") of the last probe boot on this host, if any."""
    return probe_record(layout).get("accel")


def probe_record(layout: Layout) -> dict:
    """The last probe boot's cached record: accel, and (since it was kept) what the probe saw."""
    try:
        return json.loads(layout.accel_probe.read_text())
    except (OSError, ValueError):
        return {}


def probe_again(layout: Layout, qemu: str, log: Callable[[str], None] = lambda m: None) -> dict:
    """Boot the prepared guest kernel under KVM now (capped at PROBE_TIMEOUT_S) and record what happened
    beside the cached result, keeping its key (``dhvm status --probe``). Returns the new record."""
    ok, detail = probe_kvm(qemu, layout.kernel, log)
    return _save_probe(layout, {**probe_record(layout), "accel": "kvm" if ok else "tcg", "detail": detail})


def _save_probe(layout: Layout, record: dict) -> dict:
    layout.private_dir(layout.accel_probe.parent)
    layout.accel_probe.write_text(json.dumps(record))
    return record


def choose_accel(layout: Layout, qemu: str, qemu_version: str, kernel: Path, kernel_inputs,
                 log: Callable[[str], None]) -> tuple[str, bool]:
    """KVM only if a probe boot under KVM reaches the guest kernel, else TCG; the probe runs once per
    QEMU version and kernel (``kernel_inputs``: what identifies the kernel). Returns (accel, probed now)."""
    key = hashlib.sha256(json.dumps([qemu_version, kernel_inputs], sort_keys=True, default=str).encode()).hexdigest()[:32]
    try:
        cached = json.loads(layout.accel_probe.read_text())
        if cached.get("key") == key:
            return cached["accel"], False
    except (OSError, ValueError, KeyError):
        pass
    ok, detail = probe_kvm(qemu, kernel, log)
    return _save_probe(layout, {"key": key, "accel": "kvm" if ok else "tcg", "detail": detail})["accel"], True


def host_checks(layout: Layout) -> list[Check]:
    """Linux on x86_64 and a /dev/kvm that can create a VM (and, if it was probed, boot a guest)."""
    out = [Check("linux", sys.platform == "linux" and platform.machine() == "x86_64",
                 f"{sys.platform}/{platform.machine()}", "Firecracker runs on Linux x86_64 hosts only")]
    kvm_ok = kvm_usable()
    out.append(Check("kvm_access", kvm_ok, "/dev/kvm is readable and writable" if kvm_ok else
                     "/dev/kvm is missing or not readable/writable by this user",
                     "load kvm (modprobe kvm_intel or kvm_amd), enable virtualization (nested, on a cloud VM), "
                     "and: sudo usermod -aG kvm $USER (then log in again)"))
    if kvm_ok:
        ok, detail = kvm_create_vm()
        out.append(Check("kvm_create_vm", ok, detail, "the KVM module refuses to create a VM; check dmesg"))
        probe = probe_record(layout)
        probed = probe.get("accel")
        if probed is not None:
            why = f" ({probe['detail']})" if probe.get("detail") else ""
            out.append(Check("kvm_boots_guest", probed == "kvm",
                             "a probe boot under KVM reached the guest kernel" if probed == "kvm" else
                             f"a probe boot of the guest kernel under KVM failed on this host{why}: this KVM can "
                             f"create VMs but cannot run a Linux guest (result cached by dhvm prepare in "
                             f"{layout.accel_probe})",
                             "use a host with working (nested) KVM, or: dhvm prepare --backend qemu (TCG)"))
    return out
