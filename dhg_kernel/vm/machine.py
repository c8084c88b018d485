"""What every guest gets, whatever the VMM runs it: its size, Deephaven's port, the kernel command line.

(What differs per VMM — QEMU's CPU model and accelerator, Firecracker's vCPUs and vsock — stays in
each backend's own machine description.)
"""

from __future__ import annotations

import re
from pathlib import Path

DEFAULT_RAM_MB = 2560
DEFAULT_HEAP = "1536m"
# Deephaven's port inside the guest (forwarded to a free 127.0.0.1 port on the host).
GUEST_DH_PORT = 10000


def host_tsc_khz(cpuinfo: Path = Path("/proc/cpuinfo")) -> int | None:
    """The host's TSC rate in kHz, when the host's kernel knows it (``tsc_known_freq``): an emulated
    (TCG) guest's TSC is the host's."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return None
    flags = re.search(r"^flags\s*:(.*)$", text, re.M)
    mhz = re.search(r"^cpu MHz\s*:\s*([0-9.]+)", text, re.M)
    if not flags or not mhz or not {"constant_tsc", "tsc_known_freq"} <= set(flags.group(1).split()):
        return None
    return round(float(mhz.group(1)) * 1000) or None


def guest_cmdline(heap: str, jvm_opts: str = "", tsc_khz: int | None = None) -> str:
    """The guest kernel command line: our init as PID 1 on a read-only root, settings as dhg.*.

    ``tsc_khz``: an emulated guest's TSC rate, given so its kernel does not calibrate the TSC
    against the emulated PIT. On a busy host that calibration fails ("Unable to calibrate against
    PIT"), and the guest then hangs before its first console line (seen on this 2-core machine with
    a load of 4)."""
    # tsc=reliable: without it the kernel's clocksource watchdog (checking against jiffies, which lose
    # ticks under emulation) leaves only jiffies, and the guest clock falls behind whenever the host is busy.
    words = ["console=ttyS0", "root=/dev/vda", "ro", "rootfstype=ext4", "init=/opt/dhg/init", "panic=-1",
             "quiet", "loglevel=4", "tsc=reliable", f"dhg.heap={heap}", f"dhg.dhport={GUEST_DH_PORT}"]
    if tsc_khz:
        words.append(f"tsc_early_khz={tsc_khz}")
    if jvm_opts.strip():
        words.append("dhg.jvm=" + ",".join(jvm_opts.split()))  # init turns the commas back into spaces
    return " ".join(words)
