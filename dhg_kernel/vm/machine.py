"""What every guest gets, whatever the VMM runs it: its size, Deephaven's port, the kernel command line.

(What differs per VMM — QEMU's CPU model and accelerator, Firecracker's vCPUs and vsock — stays in
each backend's own machine description.)
"""

from __future__ import annotations

DEFAULT_RAM_MB = 2560
DEFAULT_HEAP = "1536m"
# Deephaven's port inside the guest (forwarded to a free 127.0.0.1 port on the host).
GUEST_DH_PORT = 10000


def guest_cmdline(heap: str, jvm_opts: str = "") -> str:
    """The guest kernel command line: our init as PID 1 on a read-only root, settings as dhg.*."""
    # tsc=reliable: without it the kernel's clocksource watchdog (checking against jiffies, which lose
    # ticks under emulation) leaves only jiffies, and the guest clock falls behind whenever the host is busy.
    words = ["console=ttyS0", "root=/dev/vda", "ro", "rootfstype=ext4", "init=/opt/dhg/init", "panic=-1",
             "quiet", "loglevel=4", "tsc=reliable", f"dhg.heap={heap}", f"dhg.dhport={GUEST_DH_PORT}"]
    if jvm_opts.strip():
        words.append("dhg.jvm=" + ",".join(jvm_opts.split()))  # init turns the commas back into spaces
    return " ".join(words)
