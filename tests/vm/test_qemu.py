"""Real microVMs: restore from the prepared snapshot, run cells, isolation, reaping.

These boot QEMU (TCG here). The session fixture runs ``prepare`` into ``$DHG_TEST_HOME``
(default ``~/.dhg-test``), which is kept between runs: the first run builds the image and takes
a cold boot (minutes); later runs find every phase up to date in seconds.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from dhg_kernel.config import Layout
from dhg_kernel.files import PushFile
from dhg_kernel.instances import list_instances

ROOT = Path(__file__).resolve().parents[2]


# -- no VM needed ---------------------------------------------------------------------------------


def test_restore_command_maps_snapshot_ram_privately_and_restricts_the_network(tmp_path):
    from dhg_kernel.vm.qemu import Machine

    m = Machine(kernel="kernel/vmlinux", initrd="kernel/initrd.img", rootfs="rootfs/r.ext4",
                append=Machine.kernel_cmdline("1g", "-XX:TieredStopAtLevel=1 -Xss1m"))
    argv = " ".join(m.argv(tmp_path, "qemu", tmp_path / "mem", shared=False, host_port=4242, incoming=True))
    assert f"mem-path={tmp_path}/mem,share=off" in argv
    assert "restrict=on,hostfwd=tcp:127.0.0.1:4242-:10000" in argv
    assert "readonly=on" in argv and "-incoming defer" in argv
    assert "dhg.jvm=-XX:TieredStopAtLevel=1,-Xss1m" in argv and "dhg.heap=1g" in argv
    assert "share=on" in " ".join(m.argv(tmp_path, "qemu", tmp_path / "mem", True, 1, False))


def test_apt_mirror_is_read_from_the_hosts_deb822_sources(tmp_path):
    from dhg_kernel.prepare.image import apt_mirror

    src = tmp_path / "debian.sources"
    src.write_text("Types: deb\nURIs: http://mirror.example/debian/\nSuites: bookworm bookworm-updates\n\n"
                   "Types: deb\nURIs: http://mirror.example/debian-security\nSuites: bookworm-security\n")
    assert apt_mirror(src) == "http://mirror.example/debian"


def test_qmp_monitor_talks_to_a_real_qemu_through_the_library(tmp_path):
    """qemu.qmp (QEMU's own client) through our Monitor: connect while QEMU creates the socket (and
    through a path over the 108-byte limit), negotiate, run commands, and turn an error into ours."""
    import subprocess

    from dhg_kernel.errors import VMMError
    from dhg_kernel.vm.qemu import qemu_binary
    from dhg_kernel.vm.qmp import Monitor

    qemu = qemu_binary()
    if not qemu:
        pytest.skip("qemu-system-x86_64 is not installed")
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    proc = subprocess.Popen([qemu, "-nodefaults", "-S", "-machine", "microvm", "-accel", "tcg", "-m", "64M",
                             "-display", "none", "-qmp", "unix:qmp.sock,server=on,wait=off"], cwd=deep,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert len(str(deep / "qmp.sock")) > 108
        with Monitor.connect(deep / "qmp.sock", timeout=20, is_alive=lambda: proc.poll() is None) as qmp:
            assert qmp.greeting["QMP"]["version"]["qemu"]["major"] >= 7
            assert qmp.status() == "prelaunch"  # -S: stopped before the first instruction
            with pytest.raises(VMMError, match="bogus"):
                qmp.execute("bogus")
            assert qmp.status() == "prelaunch"  # the connection survives an error

        async def in_a_running_loop():
            # As in a Jupyter kernel, whose main thread runs an event loop while a cell executes.
            with Monitor.connect(deep / "qmp.sock", timeout=20) as qmp:
                return qmp.status()

        import asyncio

        assert asyncio.run(in_a_running_loop()) == "prelaunch"
        other: list = []
        t = threading.Thread(target=lambda: other.append(Monitor.connect(deep / "qmp.sock", timeout=20)))
        t.start()
        t.join()
        assert other[0].status() == "prelaunch", "a monitor opened in one thread works in another"
        other[0].close()
    finally:
        proc.kill()
        proc.wait()


# -- real VMs -------------------------------------------------------------------------------------


@pytest.mark.qemu
def test_restore_runs_a_cell_and_streams_print_output(vm):
    r = vm.execute("import platform\nprint('hello from', platform.node())")
    assert r.status == "ok", r.error
    assert r.stdout == "hello from dhg-vm\n"
    assert vm.instance.describe()["accel"] in ("tcg", "kvm")


@pytest.mark.qemu
def test_tables_come_back_as_dataframes(vm):
    r = vm.execute(textwrap.dedent("""
        from deephaven import empty_table
        t = empty_table(100).update(["X = i", "Y = X * 1.5", "S = `s` + X"]).where("X > 3")
    """), max_rows=50)
    assert r.status == "ok", r.error
    (t,) = r.tables
    assert t.name == "t" and t.rows == 96 and t.truncated
    df = t.df
    assert list(df.columns) == ["X", "Y", "S"]
    assert len(df) == 50 and df["X"].iloc[0] == 4 and df["S"].iloc[0] == "s4"


@pytest.mark.qemu
def test_state_persists_across_cells_in_one_vm(vm):
    assert vm.execute("n = 41").status == "ok"
    assert vm.execute("print(n + 1)").stdout == "42\n"


@pytest.mark.qemu
def test_pushed_file_is_readable_by_deephaven_in_the_guest(vm, tmp_path):
    csv = tmp_path / "trades.csv"
    csv.write_text("sym,px,qty\nAAPL,1.5,10\nMSFT,2.5,20\nGOOG,3.5,30\n")
    r = vm.execute("from deephaven import read_csv\ntrades = read_csv('data/trades.csv')",
                   files=[PushFile("data/trades.csv", csv, csv.stat().st_size)])
    assert r.status == "ok", r.error
    df = r.tables[0].df
    assert list(df["sym"]) == ["AAPL", "MSFT", "GOOG"] and df["qty"].sum() == 60


@pytest.mark.qemu
def test_guest_cannot_open_outbound_connections(vm):
    # A listener on the host's loopback: user networking would map it to 10.0.2.2 in the guest
    # were the VM not restricted. Nothing here leaves the machine either way.
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        port = srv.getsockname()[1]
        r = vm.execute(textwrap.dedent(f"""
            import socket
            for host in ("10.0.2.2", "10.0.2.3"):
                try:
                    socket.create_connection((host, {port}), timeout=3).close()
                    print(host, "connected")
                except OSError as e:
                    print(host, "blocked", type(e).__name__)
        """), timeout=60)
        srv.settimeout(0.1)
        with pytest.raises(socket.timeout):
            srv.accept()
    assert r.status == "ok", r.error
    assert "connected" not in r.stdout, r.stdout
    assert r.stdout.count("blocked") == 2


@pytest.mark.qemu
def test_deephaven_port_is_forwarded_to_loopback_only(vm):
    vm.start()
    port = vm.instance.host_port
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        pass  # the guest's Deephaven answers on the forwarded port
    assert vm.instance.describe()["deephaven_port"] == f"127.0.0.1:{port}"


@pytest.mark.qemu
def test_two_vms_at_once_are_isolated(qemu_home):
    from dhg_kernel.session import Session

    a, b = Session(backend="qemu", config_dir=qemu_home), Session(backend="qemu", config_dir=qemu_home)
    try:
        threads = [threading.Thread(target=s.execute, args=(f"who = {i}",)) for i, s in enumerate((a, b))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert a.execute("print(who)").stdout == "0\n"
        assert b.execute("print(who)").stdout == "1\n"
        assert a.instance.id != b.instance.id and a.instance.host_port != b.instance.host_port
        assert a.instance.alive() and b.instance.alive()
    finally:
        a.stop()
        b.stop()


@pytest.mark.qemu
def test_clones_never_write_the_snapshot_memory_file(vm, qemu_home):
    mem = Layout(qemu_home).snapshots() / "mem"
    before = mem.stat()
    assert vm.execute("x = bytearray(64 << 20)\nprint(len(x))").status == "ok"
    after = mem.stat()
    assert (after.st_mtime_ns, after.st_size) == (before.st_mtime_ns, before.st_size)


@pytest.mark.qemu
def test_stop_kills_qemu_and_removes_the_run_dir(vm):
    vm.start()
    pid, run_dir = vm.instance.proc.pid, vm.instance.dir
    vm.stop()
    assert not run_dir.exists()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


@pytest.mark.qemu
def test_killed_owner_process_is_reaped_on_next_start(qemu_home):
    owner = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(ROOT)!r})
        from dhg_kernel.session import Session
        s = Session(backend="qemu", config_dir={str(qemu_home)!r})
        s.start()
        print(s.instance.proc.pid, s.instance.dir, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """)], capture_output=True, text=True, timeout=120)
    assert owner.returncode == -signal.SIGKILL, owner.stderr
    pid_s, run_dir = owner.stdout.split()
    pid = int(pid_s)
    os.kill(pid, 0)  # the orphaned VM is still running
    from dhg_kernel.session import Session

    s = Session(backend="qemu", config_dir=qemu_home)
    try:
        s.start()  # reaps instances whose owner is gone
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
            time.sleep(0.1)
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()
        assert not Path(run_dir).exists()
    finally:
        s.stop()


@pytest.mark.qemu
def test_second_prepare_with_nothing_changed_takes_seconds(qemu_home):
    from dhg_kernel.prepare import prepare

    lines: list[str] = []
    t0 = time.monotonic()
    prepare(Layout(qemu_home), progress=lines.append)
    assert time.monotonic() - t0 < 30
    assert sum("up to date" in ln for ln in lines) == 7, lines


@pytest.mark.qemu
def test_guest_clock_is_current_and_clones_draw_different_random_numbers(qemu_home):
    from dhg_kernel.session import Session

    code = "import time, random, numpy\nprint(time.time(), random.random(), numpy.random.random())"
    a, b = Session("qemu", qemu_home), Session("qemu", qemu_home)
    try:
        outs = [s.execute(code) for s in (a, b)]
        host_now = time.time()
    finally:
        a.stop()
        b.stop()
    values = [r.stdout.split() for r in outs]
    for v in values:
        assert abs(float(v[0]) - host_now) < 30, "the restored guest's clock was set from the host"
    assert values[0][1] != values[1][1], "Python's random state was reseeded per clone"
    assert values[0][2] != values[1][2], "NumPy's random state was reseeded per clone"


@pytest.mark.qemu
def test_a_file_that_was_not_pushed_is_not_in_the_guest(vm, tmp_path):
    r = vm.execute("import os\nprint(sorted(os.listdir('.')), os.path.exists('data/never-pushed.csv'))")
    assert r.ok and r.stdout.strip().endswith("False")


@pytest.mark.qemu
def test_per_cell_mode_gives_each_cell_a_fresh_vm(qemu_home):
    from dhg_kernel.session import Session

    s = Session("qemu", qemu_home, mode="per-cell", pool_size=1)
    try:
        r1 = s.execute("from deephaven import empty_table\nfirst = empty_table(3)")
        r2 = s.execute("print('first' in globals())")
        assert r1.ok and [t.name for t in r1.tables] == ["first"]
        assert r2.stdout.strip() == "False" and r1.backend != r2.backend
        print(f"per-cell start with the warm pool: {r2.timings['start_ms']:.0f} ms; pool {s.pool.describe()}")
    finally:
        s.stop()
    assert not [r for r in list_instances(Layout(qemu_home)) if r.owner_pid == os.getpid()]


@pytest.mark.qemu
def test_a_vm_that_dies_mid_cell_is_an_error_and_the_next_cell_gets_a_new_vm(vm):
    vm.execute("x = 1")
    first = vm.instance
    # An immediate reboot of the guest: QEMU runs with -no-reboot, so the VM is simply gone.
    r = vm.execute("open('/proc/sysrq-trigger', 'w').write('b')")
    assert r.error is not None and r.error.name == "AgentDied"
    assert not first.alive()
    r = vm.execute("print('fresh', 'x' in globals())")
    assert r.ok and r.stdout.strip() == "fresh False" and vm.instance is not first


def test_missing_snapshot_says_run_prepare(tmp_path):
    from dhg_kernel.session import Session
    from dhg_kernel.vm import BackendUnavailable

    with pytest.raises(BackendUnavailable, match="run: dhvm prepare"):
        Session("qemu", tmp_path).execute("x = 1")


def test_missing_qemu_names_the_package(tmp_path):
    from dhg_kernel.vm import BackendUnavailable
    from dhg_kernel.vm.qemu import QemuBackend

    with pytest.raises(BackendUnavailable, match="apt-get install qemu-system-x86"):
        QemuBackend(Layout(tmp_path), qemu=str(tmp_path / "no-qemu-here")).binary()


def test_snapshot_of_another_backend_or_format_is_refused(tmp_path):
    import json

    from dhg_kernel.vm import BackendUnavailable
    from dhg_kernel.vm.qemu import QemuBackend

    snap = Layout(tmp_path).snapshots()
    snap.mkdir(parents=True)
    (snap / "metadata.json").write_text(json.dumps({"backend": "firecracker", "format": 1}))
    with pytest.raises(BackendUnavailable, match="not a format-.* QEMU snapshot.*--rebuild"):
        QemuBackend(Layout(tmp_path)).snapshot()


def test_auto_falls_back_to_local_with_a_visible_warning(tmp_path):
    from dhg_kernel.session import Session

    s = Session("auto", tmp_path)
    assert s.backend.name == "local"
    assert "WITHOUT isolation" in s.notice and "dhvm prepare" in s.passed_over["qemu"]


def test_clean_removes_a_versions_snapshot_of_every_backend(tmp_path):
    layout = Layout(tmp_path)
    snaps = [layout.snapshot_dir(b, "0.0-test") for b in ("qemu", "firecracker")]
    keep = layout.snapshots("0.1-other")
    for d in (*snaps, keep):
        d.mkdir(parents=True)
        (d / "mem").write_bytes(b"x" * 1000)
    p = subprocess.run([sys.executable, "-m", "dhg_kernel.cli", "clean", "--dh-version", "0.0-test",
                        "--config-dir", str(tmp_path)], capture_output=True, text=True)
    assert p.returncode == 0 and "removed" in p.stdout, p.stderr
    assert not any(d.exists() for d in snaps), "QEMU's and Firecracker's snapshots both go"
    assert keep.exists(), "another version's snapshot stays"


@pytest.mark.qemu
def test_a_restored_vm_counts_only_its_own_cells(vm):
    vm.execute("x = 1")
    vm.execute("y = 2")
    st = vm.stats()
    assert st["cells"] == 2, "the snapshot's warm-up cells are not the clone's"
    assert st["uptime_s"] < 60


def test_an_emulated_guest_is_told_the_host_tsc_rate_so_it_never_calibrates_against_the_pit(tmp_path):
    """A busy host made the guest's PIT calibration fail and the guest hang before its first console
    line; with tsc_early_khz it boots whatever the load."""
    from dhg_kernel.vm.machine import guest_cmdline, host_tsc_khz
    from dhg_kernel.vm.qemu import Machine

    known = tmp_path / "known"
    known.write_text("processor\t: 0\ncpu MHz\t\t: 2300.000\nflags\t\t: fpu tsc constant_tsc nonstop_tsc tsc_known_freq\n")
    guessed = tmp_path / "guessed"
    guessed.write_text("processor\t: 0\ncpu MHz\t\t: 1999.5\nflags\t\t: fpu tsc constant_tsc\n")
    assert host_tsc_khz(known) == 2_300_000
    assert host_tsc_khz(guessed) is None  # a rate the host kernel only measured is not passed on
    assert host_tsc_khz(tmp_path / "missing") is None
    assert "tsc_early_khz=2300000" in guest_cmdline("1g", tsc_khz=2_300_000)
    assert "tsc_early_khz" not in guest_cmdline("1g")
    assert "tsc_early_khz" not in Machine.kernel_cmdline("1g", accel="kvm")
    if host_tsc_khz():
        assert f"tsc_early_khz={host_tsc_khz()}" in Machine.kernel_cmdline("1g")


def test_every_backend_answers_the_contract_describe_and_why_not(tmp_path, qemu_home):
    """vm/base.py's contract, answered by each backend itself: describe's common fields come from base,
    the backend's own beside them; why_not says what is missing and how to get it."""
    import importlib.util

    from dhg_kernel.vm.local import LocalBackend
    from dhg_kernel.vm.qemu import QemuBackend

    ready = QemuBackend(Layout(qemu_home), heap="7g")
    assert ready.why_not() is None
    d = ready.describe()
    snap = ready.snapshot()
    assert d["backend"] == "qemu" and d["isolation"] == "QEMU microvm" and d["snapshot"] == str(snap.dir)
    assert (d["ram_mb"], d["heap"], d["accel"]) == (snap.machine.ram_mb, snap.machine.heap, snap.machine.accel)
    assert d["note"] == f"heap 7g requested, but the snapshot's JVM has {snap.machine.heap}"

    empty = QemuBackend(Layout(tmp_path), qemu=str(tmp_path / "no-qemu-here"))
    assert "apt-get install qemu-system-x86" in empty.why_not()
    assert "run: dhvm prepare" in QemuBackend(Layout(tmp_path)).why_not()
    assert "run: dhvm prepare" in empty.describe()["snapshot_error"]

    local = LocalBackend(Layout(tmp_path))
    assert local.base_snapshot() is None and not local.can_checkpoint and not local.can_fork
    assert local.describe() == {"backend": "local", "isolation": "none (a host process)", "python": local.python}
    if importlib.util.find_spec("deephaven_server") is None:
        assert "pip install 'dhg_kernel[local]'" in local.why_not()
    else:
        assert local.why_not() is None
