"""The snapshot step of ``dhvm prepare``, the same for every VM backend: cold-boot the image through
the backend, wait for the agent and warm it up through the agent client, save through the backend,
then write the metadata once and swap the finished snapshot in atomically.

What differs per backend (the machine, the VMM's calls) is the backend's ``ColdBoot``; what a
backend needs decided at prepare time (the accelerator, the Firecracker binary) is decided here.
"""

from __future__ import annotations

import datetime as _dt
import os
import shutil
import time
from pathlib import Path
from typing import Callable

from ..client import AgentClient
from ..config import DH_VERSION
from ..errors import FirecrackerMissing, PrepareError
from ..vm.base import ColdBoot, file_tail, write_snapshot_metadata
from ..vm.host import Check, choose_accel, host_checks
from .runner import PhaseRunner, input_key

# Cold boot under TCG takes minutes to a warm Deephaven; this bounds a hung one.
COLD_BOOT_TIMEOUT_S = 900.0
# How long one warm-up cell may take.
WARMUP_CELL_TIMEOUT_S = 600.0
# A kernel prints its first console line within a second; silence this long means an early hang
# (seen about once in five TCG cold boots here), so the boot is retried.
SILENT_BOOT_S = 45.0
BOOT_ATTEMPTS = 3
# How often a cold boot that is still coming up reports its console's last line.
PROGRESS_EVERY_S = 20.0
# Cells run in the cold-booted VM before the snapshot, so that what a first cell typically needs
# (formula compilation, filters, aggregations, joins, CSV, Arrow export) is loaded and JIT-compiled
# in the snapshot instead of after every restore. Each cleans up after itself.
WARMUP_CELLS = (
    'from deephaven import empty_table as _et\n'
    'warm = _et(1000).update(["A = i", "B = A * 2.5 + 1", "C = `k` + (A % 7)", "D = A % 2 == 0", "E = (long) A * 3"])'
    '.where(["B > 10", "D"])',
    'del warm\n'
    'from deephaven import agg as _agg\n'
    '_w = _et(500).update(["K = i % 10", "V = (double) i / 3"]).sum_by(["K"])\n'
    '_w = _et(200).update(["K = i % 5", "X = i * 1.5"]).agg_by([_agg.avg("AX = X"), _agg.count_("N")], by=["K"])\n'
    'del _w, _agg',
    '_a = _et(100).update(["K = i % 10", "P = i * 0.5"])\n'
    '_b = _et(10).update(["K = i", "Q = `q` + i"])\n'
    '_w = _a.natural_join(_b, on=["K"], joins=["Q"]).sort_descending(["P"]).head(20).update_view(["R = P * 2"])\n'
    'del _a, _b, _w',
    'import os as _os\n'
    'with open("/tmp/_warm.csv", "w") as _f:\n'
    '    _f.write("sym,px,qty\\nA,1.5,10\\nB,2.5,20\\n")\n'
    'from deephaven import read_csv as _rc\n'
    'warm = _rc("/tmp/_warm.csv").update(["N = px * qty"]).where("qty > 5")\n'
    '_os.remove("/tmp/_warm.csv")\n'
    'del _rc, _f',
    'del warm, _et, _os\nprint("warm")',
)


class SilentBoot(Exception):
    """The cold-boot guest printed nothing: it hung before the kernel got going (retried)."""


# -- the backend-neutral step ------------------------------------------------------------------------


def cold_boot_and_save(runner: PhaseRunner, phase: str, dh_version: str, final: Path, key: str,
                       make_cold_boot: Callable[[Path], ColdBoot]) -> dict:
    """Boot, warm up and save one snapshot into ``final`` (swapped in whole); returns its metadata.
    An early silent hang is retried up to BOOT_ATTEMPTS times."""
    for attempt in range(1, BOOT_ATTEMPTS + 1):
        try:
            return _attempt(runner, phase, dh_version, final, key, make_cold_boot)
        except PrepareError as e:
            if not isinstance(e.__cause__, SilentBoot) or attempt == BOOT_ATTEMPTS:
                raise
            runner.progress(f"{phase:9s} the guest hung before its first console line; retrying ({attempt})")
    raise AssertionError("unreachable")


def _attempt(runner: PhaseRunner, phase: str, dh_version: str, final: Path, key: str,
             make_cold_boot: Callable[[Path], ColdBoot]) -> dict:
    work = final.with_name(final.name + ".new")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, mode=0o700)
    kept_console = runner.layout.cold_boot_console
    vm = make_cold_boot(work)
    t0 = time.monotonic()
    try:
        vm.boot()
        client = AgentClient(vm.connect(COLD_BOOT_TIMEOUT_S))
        try:
            hello = client.hello(COLD_BOOT_TIMEOUT_S, tick=(2.0, _boot_watch(runner, phase, vm, t0)))
            boot_s = time.monotonic() - t0
            runner.progress(f"{phase:9s} agent ready after a {boot_s:.0f}s cold boot "
                            f"(Deephaven {hello.get('deephaven_version')})")
            warm = warm_up(runner, phase, client)
            backend_meta = vm.save(work, client)
        finally:
            client.close()
    except Exception as e:  # noqa: BLE001 - every failure becomes a PrepareError with the console attached
        why = (f"cold boot or snapshot failed: {type(e).__name__}: {e}\n--- guest console (last lines) ---\n"
               f"{file_tail(vm.console)}\n--- {vm.vmm_log.name} ---\n{file_tail(vm.vmm_log)}")
        if vm.console.exists():
            shutil.copyfile(vm.console, kept_console)
        vm.destroy()
        raise runner.fail(phase, why, f"see the guest console {kept_console}; then run: dhvm prepare"
                          + (" --backend firecracker" if phase == "fc-snapshot" else "")) \
            from (e if isinstance(e, SilentBoot) else None)
    shutil.move(str(vm.console), work / "cold-boot-console.log")
    vm.destroy()
    meta = {
        "dh_version": dh_version,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "key": key, "phase_keys": dict(runner.keys), "inputs": runner.inputs, "warm_up": warm,
        "agent": {k: hello.get(k) for k in ("agent_version", "deephaven_version", "python", "server", "startup_ms")},
        **backend_meta,
        "timings": {"cold_boot_s": round(boot_s, 1), **backend_meta.get("timings", {})},
    }
    write_snapshot_metadata(work, meta)  # written once, last: its presence marks a complete snapshot
    # Swap the finished snapshot in; clones of the old one keep its (unlinked) mem file mapped.
    old = final.with_name(final.name + f".old-{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    os.replace(work, final)
    shutil.rmtree(old, ignore_errors=True)
    runner.progress(f"{phase:9s} {vm.summary(meta)}")
    return meta


def _boot_watch(runner: PhaseRunner, phase: str, vm: ColdBoot, t0: float) -> Callable[[], None]:
    """What runs while the cold boot comes up: give up if the VMM died or the guest stays silent,
    and say how far the boot got every PROGRESS_EVERY_S."""
    last_note = [time.monotonic()]

    def check() -> None:
        if not vm.alive():
            raise RuntimeError(f"the VMM exited during the cold boot (see {vm.vmm_log.name})")
        if time.monotonic() - t0 > SILENT_BOOT_S and not (vm.console.exists() and vm.console.stat().st_size):
            raise SilentBoot(f"no guest console output after {SILENT_BOOT_S:.0f}s")
        if time.monotonic() - last_note[0] > PROGRESS_EVERY_S:
            last_note[0] = time.monotonic()
            runner.progress(f"{phase:9s} cold boot {time.monotonic() - t0:.0f}s: {_last_line(vm.console)}")

    return check


def warm_up(runner: PhaseRunner, phase: str, client: AgentClient) -> list[dict]:
    """Run WARMUP_CELLS in the agent; a failing one is logged, not fatal (the VM still works)."""
    from .. import protocol as P

    out = []
    t0 = time.monotonic()
    for i, code in enumerate(WARMUP_CELLS):
        errors: list[str] = []

        def on_frame(frame: P.Frame) -> None:
            if frame.header.get("ev") == P.EV_ERROR:
                errors.append(f"{frame.header.get('name')}: {frame.header.get('value')}")

        t1 = time.monotonic()
        done = client.run_code(code, on_frame, timeout=WARMUP_CELL_TIMEOUT_S)
        status, secs = done.get("status", "?"), round(time.monotonic() - t1, 1)
        out.append({"cell": i, "status": status, "seconds": secs, **({"error": errors[0]} if errors else {})})
        runner.log(f"warm-up cell {i}: {status} in {secs}s{' ' + errors[0] if errors else ''}")
    runner.progress(f"{phase:9s} warm-up cells: {len(WARMUP_CELLS)} in {time.monotonic() - t0:.0f}s "
                    f"({sum(c['status'] != 'ok' for c in out)} failed)")
    return out


# -- per backend: what is decided at prepare time ----------------------------------------------------


def qemu_snapshot(runner: PhaseRunner, dh_version: str = DH_VERSION, ram_mb: int | None = None,
                  heap: str | None = None, accel: str = "auto", jvm_opts: str | None = None):
    """The QEMU snapshot: the accelerator (KVM only if a probe boot works), the machine, the cold boot."""
    from ..vm import qemu as q

    layout = runner.layout
    qemu = q.qemu_binary()
    if not qemu:
        raise runner.fail("snapshot", "qemu-system-x86_64 is not installed", "run: apt-get install qemu-system-x86")
    version = q.qemu_version(qemu)
    if accel not in ("tcg", "kvm"):
        accel, probed = choose_accel(layout, qemu, version, layout.kernel, runner.inputs.get("kernel"), runner.log)
        if probed:
            runner.progress(f"accel     {accel} (KVM probe boot {'succeeded' if accel == 'kvm' else 'failed or unavailable'})")
    heap = heap or q.DEFAULT_HEAP
    machine = q.Machine(kernel=layout.rel(layout.kernel), initrd=layout.rel(layout.initrd),
                        rootfs=layout.rel(layout.rootfs_image(dh_version)), ram_mb=ram_mb or q.DEFAULT_RAM_MB, heap=heap,
                        accel=accel, cpu=q.TCG_CPU if accel == "tcg" else "host",
                        append=q.Machine.kernel_cmdline(heap, jvm_opts if jvm_opts is not None
                                                        else q.TCG_JVM_OPTS if accel == "tcg" else "", accel))
    key = input_key("snapshot", runner.keys["image"], runner.keys["kernel"], version, machine.__dict__, WARMUP_CELLS)
    final = layout.snapshots(dh_version)

    def build() -> None:
        meta = cold_boot_and_save(runner, "snapshot", dh_version, final, key,
                                  lambda work: q.QemuColdBoot(layout, qemu, machine, work, runner.log))
        assert meta["backend"] == "qemu"

    runner.phase("snapshot", key, (final / q.Snapshot.METADATA, final / "mem", final / "state"), build)
    return q.Snapshot.load(final)


def firecracker_snapshot(runner: PhaseRunner, dh_version: str = DH_VERSION, ram_mb: int | None = None,
                         heap: str | None = None, jvm_opts: str | None = None, binary: str | None = None,
                         jailer: str | None = None, network: bool = False, fc_version: str | None = None,
                         jailer_user: tuple[int, int] | None = None):
    """The Firecracker snapshot: obtain the binary, check the host, then cold-boot through its API."""
    from ..vm import firecracker as fcm
    from ..vm import netns
    from ..vm.fc_api import DEFAULT_VERSION
    from ..vm.fc_release import obtain
    from ..vm.machine import DEFAULT_HEAP, DEFAULT_RAM_MB
    from ..vm.qemu import qemu_binary, qemu_version

    layout = runner.layout
    checks = host_checks(layout)
    try:
        fc = obtain(layout, binary, fc_version or DEFAULT_VERSION, jailer)
        checks.append(Check("firecracker", True, f"Firecracker {'.'.join(map(str, fc.version))} at {fc.path}"))
        runner.progress(f"firecracker {fc.path} (v{'.'.join(map(str, fc.version))}, {fc.source})")
    except FirecrackerMissing as e:
        fc = None
        checks.append(Check("firecracker", False, str(e)))
    qemu = qemu_binary()
    if fc is not None and all(c.ok for c in checks) and qemu and not any(c.name == "kvm_boots_guest" for c in checks):
        # A QEMU probe boot under KVM tells a usable KVM from one that cannot run a guest (as here).
        accel, _ = choose_accel(layout, qemu, qemu_version(qemu), layout.kernel, runner.inputs.get("kernel"), runner.log)
        checks.append(Check("kvm_boots_guest", accel == "kvm", f"a probe boot under KVM "
                            f"{'reached' if accel == 'kvm' else 'did not reach'} the guest kernel",
                            "use a host with working (nested) KVM, or: dhvm prepare --backend qemu"))
    if network:
        reason = netns.why_not()
        checks.append(Check("network", reason is None, reason or "ok"))
    for c in checks:
        runner.log(f"check {c.name}: {'ok' if c.ok else 'FAILED'}: {c}")
    failed = [c for c in checks if not c.ok]
    if failed:
        first = failed[0]
        raise runner.fail("fc-snapshot", f"the image is built ({layout.rootfs_image(dh_version)}, {layout.kernel}), "
                          "but the Firecracker snapshot needs Linux + a working /dev/kvm + firecracker, and the check "
                          f"'{first.name}' failed: {first.detail}" +
                          "".join(f"\n  also failed: {c.name}: {c.detail}" for c in failed[1:]),
                          first.fix or "fix the failed check, then run: dhvm prepare --backend firecracker")
    assert fc is not None
    heap = heap or DEFAULT_HEAP
    machine = fcm.FcMachine(kernel=layout.rel(layout.kernel), initrd=layout.rel(layout.initrd),
                            rootfs=layout.rel(layout.rootfs_image(dh_version)), ram_mb=ram_mb or DEFAULT_RAM_MB,
                            heap=heap, network=network,
                            # KVM: the JIT needs no TCG workaround
                            boot_args=fcm.FcMachine.kernel_cmdline(heap, jvm_opts or "", network))
    version = ".".join(map(str, fc.version))
    key = input_key("fc-snapshot", runner.keys["image"], runner.keys["kernel"], version, machine.__dict__,
                    WARMUP_CELLS, str(fc.jailer) if jailer else None, list(jailer_user) if jailer_user else None)
    final = layout.firecracker_snapshots(dh_version)
    # The cold boot runs unjailed; restores run under the jailer recorded here (if one was given).
    launcher = fcm.Launcher(fc)

    restore_jailer = str(fc.jailer) if jailer and fc.jailer else None

    def build() -> None:
        def make(work: Path) -> ColdBoot:
            return fcm.FcColdBoot(layout, launcher, machine, runner.log, restore_jailer=restore_jailer,
                                  restore_jailer_user=jailer_user if restore_jailer else None)

        cold_boot_and_save(runner, "fc-snapshot", dh_version, final, key, make)

    runner.phase("fc-snapshot", key, (final / fcm.FcSnapshot.METADATA, final / fcm.MEM_NAME), build)
    return fcm.FcSnapshot.load_from(final, layout.vm)


def _last_line(path: Path) -> str:
    lines = [ln for ln in file_tail(path, 5).splitlines() if ln.strip()]
    return lines[-1][:100] if lines else "(no console output yet)"


__all__ = ["BOOT_ATTEMPTS", "COLD_BOOT_TIMEOUT_S", "SilentBoot", "WARMUP_CELLS", "cold_boot_and_save",
           "firecracker_snapshot", "qemu_snapshot", "warm_up"]
