"""A guest that this machine's KVM can run: a few dozen 32-bit instructions, booted by PVH.

This host's /dev/kvm creates VMs, but a Linux guest cannot run on it (docs/design-facts.md). So the tests and
the bench that drive a real Firecracker boot this instead, assembled here with binutils (``as``,
``ld``) at test time. It is an ELF with the PVH entry note (name "Xen", type 18 = PHYS32_ENTRY), so
Firecracker ≥ 1.12 enters it in 32-bit protected mode with paging off. It:

1. prints ``dhg test guest: up`` on the serial port (Firecracker's stdout: the instance's agent.log);
2. finds the virtio-mmio vsock device (magic "virt", device id 19) in Firecracker's MMIO window and
   brings it up the virtio 1.0 way: reset, ACKNOWLEDGE, DRIVER, VERSION_1, FEATURES_OK, three
   queues, DRIVER_OK. The RX queue gets 16 writable buffers and the event queue one, so Firecracker
   can deliver a connection request and, at a snapshot, its transport-reset event;
3. prints ``dhg test guest: vsock ready`` (or ``no vsock device``) and halts, interrupts off, for good.

Nothing in the guest ever answers on vsock. A host ``CONNECT <port>`` is delivered into an RX buffer
and Firecracker, getting no reply, closes the host's connection after its request timeout (2 s in
``vsock/csm``): exactly what a guest whose agent does not listen looks like from the host.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

UP = "dhg test guest: up"
VSOCK_READY = "dhg test guest: vsock ready"
NO_VSOCK = "dhg test guest: no vsock device"

# Firecracker's x86_64 MMIO window starts at 4 GiB - 768 MiB; devices sit one page apart.
MMIO_START = 0xD0000000
RX_BUFFERS = 16

SOURCE = r"""
    .code32
    .text
    .globl _start
_start:
    cli
    mov $0x280000, %esp
    mov $msg_up, %esi
    call puts

    /* Find the vsock device: the first of 64 MMIO slots saying "virt" with device id 19. */
    mov $MMIO_START, %esi
    mov $64, %ecx
find:
    cmpl $0x74726976, (%esi)
    jne next
    cmpl $19, 8(%esi)
    je found
next:
    add $0x1000, %esi
    loop find
    mov $msg_none, %esi
    call puts
halt:
    hlt
    jmp halt

found:
    mov %esi, DEVICE
    /* RX queue (0): descriptors at 0x300000, each a writable 4 KiB buffer from 0x400000 on. */
    mov $0x300000, %edi
    mov $0x400000, %eax
    xor %ecx, %ecx
rx:
    mov %eax, (%edi)
    movl $0, 4(%edi)
    movl $0x1000, 8(%edi)
    movw $2, 12(%edi)
    movw $0, 14(%edi)
    movw %cx, 0x301004(,%ecx,2)
    add $16, %edi
    add $0x1000, %eax
    inc %ecx
    cmp $RX_BUFFERS, %ecx
    jne rx
    movw $RX_BUFFERS, 0x301002
    movw $RX_BUFFERS, RX_AVAIL
    movw $0, RX_SEEN
    movw $0, TX_AVAIL
    /* Event queue (2): one writable 8-byte buffer. */
    movl $0x500000, 0x320000
    movl $0, 0x320004
    movl $8, 0x320008
    movw $2, 0x32000c
    movw $0, 0x321004
    movw $1, 0x321002

    /* Interrupts: every vector to one handler; local APIC on; IOAPIC pins 5-23 (Firecracker's
       virtio GSIs) to vector 0x30, edge, CPU 0. */
    mov $isr, %eax
    mov %cs, %bx
    mov $0x2e0000, %edi
    mov $256, %ecx
gate:
    mov %ax, (%edi)
    mov %bx, 2(%edi)
    movw $0x8e00, 4(%edi)
    mov %eax, %edx
    shr $16, %edx
    mov %dx, 6(%edi)
    add $8, %edi
    loop gate
    movw $2047, 0x2e1000
    movl $0x2e0000, 0x2e1002
    lidt 0x2e1000
    movl $0x1ff, 0xfee000f0
    movl $0, 0xfee00080
    mov $5, %ecx
pin:
    lea 0x10(,%ecx,2), %eax
    mov %eax, 0xfec00000
    movl $0x30, 0xfec00010
    inc %eax
    mov %eax, 0xfec00000
    movl $0, 0xfec00010
    inc %ecx
    cmp $24, %ecx
    jne pin

    /* virtio 1.0 initialisation (status values are cumulative). */
    movl $0, 0x70(%esi)
    movl $1, 0x70(%esi)
    movl $3, 0x70(%esi)
    movl $1, 0x24(%esi)
    movl $1, 0x20(%esi)
    movl $0, 0x24(%esi)
    movl $0, 0x20(%esi)
    movl $11, 0x70(%esi)
    /* Queues 0..2: descriptors at 0x300000 + q*64K, avail ring 4K above, used ring 8K above. */
    xor %edx, %edx
queue:
    mov %edx, 0x30(%esi)
    movl $RX_BUFFERS, 0x38(%esi)
    mov %edx, %eax
    shl $16, %eax
    add $0x300000, %eax
    mov %eax, 0x80(%esi)
    movl $0, 0x84(%esi)
    lea 0x1000(%eax), %ebx
    mov %ebx, 0x90(%esi)
    movl $0, 0x94(%esi)
    lea 0x2000(%eax), %ebx
    mov %ebx, 0xa0(%esi)
    movl $0, 0xa4(%esi)
    movl $1, 0x44(%esi)
    inc %edx
    cmp $3, %edx
    jne queue
    movl $15, 0x70(%esi)
    mov $msg_ready, %esi
    call puts
    mov DEVICE, %esi

    /* Sleep until an interrupt, then answer what arrived; sti;hlt cannot miss one. The handler
       never returns: it starts this loop over on a fresh stack, because this KVM emulates the
       guest and its emulator has no protected-mode iret. Interrupts only come during hlt. */
wait:
    call poll
    sti
    hlt
    jmp wait

/* For every packet the device put in an RX buffer: answer a connection REQUEST with RST (nothing
   listens here), then give the buffer back. */
poll:
    movzwl 0x302002, %eax
    movzwl RX_SEEN, %ebx
    cmp %ebx, %eax
    je done
    mov %ebx, %ecx
    and $15, %ecx
    mov 0x302004(,%ecx,8), %edx
    mov %edx, %edi
    shl $12, %edi
    add $0x400000, %edi
    cmpw $1, 30(%edi)
    jne repost
    movzwl TX_AVAIL, %ecx
    and $15, %ecx
    mov %ecx, %ebp
    shl $6, %ebp
    add $0x600000, %ebp
    movl $3, 0(%ebp)
    movl $0, 4(%ebp)
    movl $2, 8(%ebp)
    movl $0, 12(%ebp)
    mov 20(%edi), %eax
    mov %eax, 16(%ebp)
    mov 16(%edi), %eax
    mov %eax, 20(%ebp)
    movl $0, 24(%ebp)
    movw $1, 28(%ebp)
    movw $3, 30(%ebp)
    movl $0, 32(%ebp)
    movl $0, 36(%ebp)
    movl $0, 40(%ebp)
    mov %ecx, %eax
    shl $4, %eax
    add $0x310000, %eax
    mov %ebp, (%eax)
    movl $0, 4(%eax)
    movl $44, 8(%eax)
    movl $0, 12(%eax)
    movw %cx, 0x311004(,%ecx,2)
    incw TX_AVAIL
    movzwl TX_AVAIL, %eax
    movw %ax, 0x311002
    movl $1, 0x50(%esi)
repost:
    movzwl RX_AVAIL, %ecx
    and $15, %ecx
    movw %dx, 0x301004(,%ecx,2)
    incw RX_AVAIL
    movzwl RX_AVAIL, %eax
    movw %ax, 0x301002
    movl $0, 0x50(%esi)
    incw RX_SEEN
    jmp poll
done:
    ret

isr:
    mov $0x280000, %esp
    mov DEVICE, %esi
    mov 0x60(%esi), %eax
    mov %eax, 0x64(%esi)
    movl $0, 0xfee000b0
    jmp wait

/* Print the NUL-terminated string at %esi on COM1. */
puts:
    mov $0x3f8, %dx
2:  lodsb
    test %al, %al
    jz 3f
    out %al, %dx
    jmp 2b
3:  ret

msg_up:    .asciz "UP\n"
msg_ready: .asciz "VSOCK_READY\n"
msg_none:  .asciz "NO_VSOCK\n"

    .section .note.Xen, "a"
    .p2align 2
    .long 4
    .long 4
    .long 18
    .asciz "Xen"
    .p2align 2
    .long _start
"""


def tools_missing() -> str | None:
    """Why the guest cannot be built here, or None."""
    missing = [t for t in ("as", "ld") if shutil.which(t) is None]
    return f"binutils ({', '.join(missing)}) not installed: apt-get install binutils" if missing else None


def source() -> str:
    return (SOURCE.replace("MMIO_START", hex(MMIO_START)).replace("RX_BUFFERS", str(RX_BUFFERS))
            .replace("DEVICE", "0x2f0000").replace("RX_AVAIL", "0x2f0004").replace("RX_SEEN", "0x2f0008")
            .replace("TX_AVAIL", "0x2f000c")
            .replace('"UP\\n"', f'"{UP}\\n"').replace('"VSOCK_READY\\n"', f'"{VSOCK_READY}\\n"')
            .replace('"NO_VSOCK\\n"', f'"{NO_VSOCK}\\n"'))


def build(dest: Path) -> Path:
    """Assemble and link the guest into ``dest``/vmlinux; returns its path."""
    dest.mkdir(parents=True, exist_ok=True)
    asm, obj, elf = dest / "guest.S", dest / "guest.o", dest / "vmlinux"
    asm.write_text(source())
    subprocess.run(["as", "--64", "-o", str(obj), str(asm)], check=True, capture_output=True, text=True)
    # Linked at 2 MiB: nothing may load below 1 MiB, and the queues live at 3-5 MiB.
    subprocess.run(["ld", "-m", "elf_x86_64", "-N", "-Ttext=0x200000", "--no-warn-rwx-segments", "-o", str(elf),
                    str(obj)], check=True, capture_output=True, text=True)
    obj.unlink()
    return elf


# -- a Firecracker snapshot of it, made through the backend's own cold boot --------------------------

def find_firecracker(repo: Path) -> tuple[str | None, str]:
    """The real binary to test against: $DHG_TEST_FIRECRACKER, then ../shared/firecracker/bin/ beside
    the project, then ``firecracker`` on PATH. Returns (path or None, where it came from / why not)."""
    import os

    env = os.environ.get("DHG_TEST_FIRECRACKER")
    if env:
        return env, "$DHG_TEST_FIRECRACKER"
    shared = sorted((repo.parent / "shared" / "firecracker" / "bin").glob("firecracker-v*-x86_64"))
    if shared:
        return str(shared[-1]), "../shared/firecracker/bin"
    on_path = shutil.which("firecracker")
    if on_path:
        return on_path, "PATH"
    return None, ("no Firecracker binary: set $DHG_TEST_FIRECRACKER, or put one in ../shared/firecracker/bin/ "
                  "or on PATH")


def guest_refuses(vsock_path: Path, port: int = 52, timeout: float = 3.0) -> float:
    """CONNECT to ``port`` through a clone's hybrid-vsock socket; the guest answers RST, so the host
    sees the connection closed. Returns how long that took (an AssertionError if it never did, which
    means the guest, its vsock device or Firecracker's muxer is not running)."""
    import socket
    import time

    from dhg_kernel.vm.base import connect_unix

    t0 = time.perf_counter()
    s = connect_unix(Path(vsock_path), timeout)
    try:
        s.settimeout(timeout)
        s.sendall(f"CONNECT {port}\n".encode())
        try:
            got = s.recv(64)
        except socket.timeout:
            raise AssertionError(f"no answer to CONNECT {port} within {timeout}s: the guest is not running") from None
    finally:
        s.close()
    assert got == b"", f"unexpected reply {got!r}"
    return time.perf_counter() - t0


def wait_for_console(path: Path, text: str, timeout: float = 10.0) -> str:
    """The console once it holds ``text`` (the guest got that far); AssertionError with it otherwise."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        out = path.read_text(errors="replace") if path.exists() else ""
        if text in out:
            return out
        if time.monotonic() > deadline:
            raise AssertionError(f"the guest never printed {text!r}; console:\n{out[-2000:]}")
        time.sleep(0.02)


def machine(ram_mb: int = 128, network: bool = False, initrd: bool = False):
    """The test guest's machine: its kernel, a 1 MiB root disk it never reads, the product's boot args."""
    from dhg_kernel.vm.firecracker import FcMachine

    return FcMachine(kernel="vmlinux", initrd="initrd.img" if initrd else None, rootfs="rootfs.ext4", ram_mb=ram_mb,
                     vcpus=1, heap="1g", network=network, boot_args=FcMachine.kernel_cmdline("1g", "", network))


def make_home(home: Path, network: bool = False, initrd: bool = False, ram_mb: int = 128, fc_path: str = "",
              dh_version: str | None = None, netns_parent: str | None = None):
    """A DHG_HOME whose Firecracker base snapshot is the test guest: built, cold-booted through
    ``FcColdBoot`` (the calls ``dhvm prepare`` sends) until its vsock device is up, then saved the way
    prepare saves. Returns (layout, binary, snapshot metadata)."""
    import datetime as dt
    import os

    from dhg_kernel.config import DH_VERSION, Layout
    from dhg_kernel.vm.base import write_snapshot_metadata
    from dhg_kernel.vm.fc_release import from_path
    from dhg_kernel.vm.firecracker import FcColdBoot, Launcher

    layout = Layout(home)
    build(layout.vm)
    with open(layout.vm / "rootfs.ext4", "wb") as fh:
        fh.truncate(1 << 20)
    if initrd:
        (layout.vm / "initrd.img").write_bytes(b"dhg test initrd\n" * 64)
    fc = from_path(fc_path)
    m = machine(ram_mb, network, initrd)
    final = layout.firecracker_snapshots(dh_version or DH_VERSION)
    work = final.with_name(final.name + ".new")
    work.mkdir(parents=True, mode=0o700)
    vm = FcColdBoot(layout, Launcher(fc), m, lambda msg: None, netns_parent=netns_parent)
    try:
        vm.boot()
        wait_for_console(vm.console, VSOCK_READY)
        meta = vm.save(work, None)
    finally:
        vm.destroy()
    meta = {"dh_version": dh_version or DH_VERSION, "key": "test-guest",
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), **meta}
    write_snapshot_metadata(work, meta)
    os.replace(work, final)
    return layout, fc, meta
