"""The Firecracker backend against a real Firecracker and its real jailer.

The binary is ``$DHG_TEST_FIRECRACKER``, else ``../shared/firecracker/bin/`` beside the project
(v1.12.1, for tests only: see PROVENANCE.md there), else ``firecracker`` on PATH. These tests need a
/dev/kvm that can create a VM; they skip, saying why, elsewhere.

This machine's KVM cannot run a Linux guest, so the guest is ``fcguest``: a few dozen instructions,
assembled here, that bring up the virtio vsock device and answer every connection request with RST
(nothing listens). Every call the backend makes goes to the real binary through the backend's own
code: the cold boot (``FcColdBoot``), snapshot create, restore (``restore``), checkpoints
(``checkpoint.save``), the jailer (``Launcher``) and the TAP in a network namespace (``netns``).
What cannot run here: our agent in the guest, init's vsock relay, a real restore-to-first-result.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import fcguest
from dhg_kernel.config import Layout
from dhg_kernel.vm.host import kvm_create_vm

REPO = Path(__file__).resolve().parents[2]
FC_PATH, FC_WHERE = fcguest.find_firecracker(REPO)
NOBODY = 65534


def _why_not() -> str | None:
    if not sys.platform.startswith("linux"):
        return "Firecracker runs on Linux only"
    if FC_PATH is None:
        return FC_WHERE
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "/dev/kvm is missing or not readable and writable"
    ok, detail = kvm_create_vm()
    if not ok:
        return detail
    return fcguest.tools_missing()


WHY_NOT = _why_not()
pytestmark = pytest.mark.skipif(WHY_NOT is not None, reason=f"no real Firecracker here: {WHY_NOT}")


# -- helpers ---------------------------------------------------------------------------------------


def _destroy_all(layout: Layout) -> None:
    from dhg_kernel.instances import destroy, list_instances

    for rec in list_instances(layout):
        destroy(rec)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A DHG_HOME whose base snapshot is the test guest, made through the backend's cold boot."""
    home = tmp_path_factory.mktemp("fc-real") / "home"
    layout, fc, meta = fcguest.make_home(home, initrd=True, fc_path=FC_PATH)
    yield layout, fc, meta
    _destroy_all(layout)


def _backend(layout: Layout, **kw):
    from dhg_kernel.vm.firecracker import FirecrackerBackend

    return FirecrackerBackend(layout, firecracker=FC_PATH, **kw)


def _restore(backend, snap=None, **kw):
    from dhg_kernel.vm.firecracker import restore

    return restore(backend.layout, backend.launcher(backend.binary()), snap or backend.base_snapshot(),
                   agent=False, **kw)


def _state(inst) -> str:
    return inst.api.request("GET", "/", None)["state"]


def _digest(path: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest(), path.stat().st_mtime_ns


def _api_connections(pid: int) -> int:
    """Established unix connections the process holds (its API server's, here)."""
    out = subprocess.run(["ss", "-xpn"], capture_output=True, text=True).stdout
    return sum(1 for line in out.splitlines() if f"pid={pid}," in line and line.split()[1] == "ESTAB")


def _mapped_private(pid: int, target: Path) -> list[str]:
    """The lines of /proc/PID/maps that map ``target``."""
    real = str(target.resolve())
    return [line for line in Path(f"/proc/{pid}/maps").read_text().splitlines() if line.endswith(real)]


# -- the cold boot and the snapshot ----------------------------------------------------------------


def test_the_real_binary_takes_every_cold_boot_call_then_snapshots_the_running_guest(base, tmp_path):
    from dhg_kernel.vm.firecracker import FcColdBoot, Launcher, MEM_NAME, VMSTATE_NAME

    layout, fc, _ = base
    m = fcguest.machine(initrd=True)
    vm = FcColdBoot(layout, Launcher(fc), m, lambda msg: None)
    try:
        vm.boot()  # logger, machine-config, boot-source, drive, vsock, entropy, InstanceStart: all real
        assert [p for _, p, _ in vm.api.calls] == ["/logger", "/machine-config", "/boot-source", "/drives/rootfs",
                                                    "/vsock", "/entropy", "/actions"]
        console = fcguest.wait_for_console(vm.console, fcguest.VSOCK_READY)
        assert fcguest.UP in console
        info = vm.api.request("GET", "/", None)
        assert info["state"] == "Running" and info["vmm_version"] == ".".join(map(str, fc.version))
        cfg = vm.api.request("GET", "/vm/config", None)
        assert cfg["machine-config"]["mem_size_mib"] == m.ram_mb and cfg["machine-config"]["vcpu_count"] == m.vcpus
        assert cfg["boot-source"]["initrd_path"] == "initrd.img" and cfg["boot-source"]["boot_args"] == m.boot_args
        assert cfg["drives"][0]["is_read_only"] is True and cfg["drives"][0]["path_on_host"] == "rootfs.ext4"
        assert cfg["vsock"] == {"guest_cid": 3, "uds_path": "vsock.sock"}
        # Firecracker's API server takes 10 connections at most: a client must not keep one per path.
        for path in ("/", "/vm/config", "/machine-config", "/version", "/", "/vm/config"):
            vm.api.request("GET", path, None)
        assert _api_connections(vm.proc.pid) <= 1
        work = tmp_path / "snap"
        work.mkdir()
        api = vm.api
        meta = vm.save(work, None)
        assert [(m, p) for m, p, _ in api.calls[-2:]] == [("PATCH", "/vm"), ("PUT", "/snapshot/create")]
    finally:
        vm.destroy()
    assert (work / MEM_NAME).stat().st_size == m.ram_mb * 2**20
    assert 0 < (work / VMSTATE_NAME).stat().st_size < 1 << 20
    assert meta["firecracker_version"] == ".".join(map(str, fc.version))
    assert not (work / MEM_NAME).stat().st_mode & 0o222  # read-only: clones map it, nothing writes it


def test_version_gating_is_what_the_real_binary_accepts(base, tmp_path):
    """Each field the backend gates by version, sent raw to the real binary: it must answer "unknown
    field" exactly when the gate says this version lacks it, and the client must refuse it first."""
    from dhg_kernel.errors import FirecrackerAPIError
    from dhg_kernel.vm.fc_api import FIELD_SINCE, FirecrackerAPI, SpecError, supports, version_str
    from dhg_kernel.vm.firecracker import Call, send

    layout, fc, _ = base
    snap = _backend(layout).base_snapshot()
    samples = {"network_overrides": [{"iface_id": "eth0", "host_dev_name": "dhg-tap0"}], "track_dirty_pages": True,
               "vsock_override": {"uds_path": "vsock.sock"}, "clock_realtime": True}
    seen = {}
    for (definition, field), since in FIELD_SINCE.items():
        assert definition == "SnapshotLoadParams", "a new gated definition needs a sample here"
        root = tmp_path / field
        root.mkdir()
        for name, target in (("vmstate", snap.vmstate), ("mem", snap.mem), ("rootfs.ext4", snap.disks["rootfs"])):
            os.symlink(target, root / name)
        proc = subprocess.Popen([str(fc.path), "--api-sock", "api.sock"], cwd=root, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            api = FirecrackerAPI(root / "api.sock", fc.version)
            api.wait_ready(is_alive=lambda: proc.poll() is None)
            body = {"snapshot_path": "vmstate", "mem_backend": {"backend_type": "File", "backend_path": "mem"},
                    field: samples[field]}
            try:
                api.request("PUT", "/snapshot/load", body)  # raw: no gate, no spec
                fault = ""
            except FirecrackerAPIError as e:
                fault = e.fault
            seen[field] = fault
            known = supports(fc.version, definition, field)
            assert ("unknown field" in fault) == (not known), \
                f"{field} (gated at {version_str(since + (0,))}): Firecracker {version_str(fc.version)} said {fault!r}"
            if not known:
                assert f"`{field}`" in fault and re.search(r"HTTP|unknown", fault)
                with pytest.raises(SpecError, match=field):  # and the client never sends it
                    send(api, [Call("PUT", "/snapshot/load", definition, body)])
        finally:
            proc.kill()
            proc.wait()
    print("\n" + "\n".join(f"  {f}: {v or 'accepted'}" for f, v in seen.items()), file=sys.stderr)


def test_three_clones_restore_at_once_from_one_snapshot_and_never_write_it(base):
    from dhg_kernel.vm.firecracker import VSOCK_UDS

    layout, fc, _ = base
    backend = _backend(layout)
    snap = backend.base_snapshot()
    before = _digest(snap.mem)
    with ThreadPoolExecutor(3) as pool:
        clones = list(pool.map(lambda _: _restore(backend, snap), range(3)))
    try:
        roots = {c.root for c in clones}
        assert len(roots) == 3
        for c in clones:
            assert _state(c) == "Running"
            assert c.vsock_path == c.root / VSOCK_UDS and c.vsock_path.is_socket()
            maps = _mapped_private(c.proc.pid, snap.mem)
            assert maps and all(line.split()[1].endswith("p") for line in maps), maps  # MAP_PRIVATE
            fcguest.guest_refuses(c.vsock_path)  # the restored guest runs and its vsock device answers
        print(f"\n  load times (process start -> resumed): {[c.timings['loaded_ms'] for c in clones]} ms",
              file=sys.stderr)
    finally:
        for c in clones:
            c.stop()
    assert _digest(snap.mem) == before
    assert not snap.mem.stat().st_mode & 0o222
    assert all(not c.root.exists() for c in clones)


def test_a_restored_guest_without_an_agent_fails_fast_with_agent_not_listening(base):
    from dhg_kernel.errors import AgentStartError
    from dhg_kernel.instances import list_instances
    from dhg_kernel.vm.firecracker import RESTORE_REFUSED_S, restore

    layout, fc, _ = base
    backend = _backend(layout)
    t0 = time.monotonic()
    with pytest.raises(AgentStartError) as e:
        restore(layout, backend.launcher(fc), backend.base_snapshot(), timeout=30)  # the real path: agent=True
    took = time.monotonic() - t0
    msg = str(e.value)
    assert "agent not listening on guest vsock port 52" in msg and "the guest refused" in msg, msg
    tries = int(re.search(r"refused (\d+) connection", msg).group(1))
    # Bounded: it gave up once the guest had refused for RESTORE_REFUSED_S, not at the 30 s timeout,
    # and the retries backed off (a few dozen, not thousands).
    assert took < 30 and tries <= 40, (took, tries)
    assert RESTORE_REFUSED_S <= took
    assert "firecracker.log" in msg  # the VMM's log comes with it
    assert list_instances(layout) == []  # the clone was stopped and its run dir removed


@pytest.mark.parametrize("jailed", [False, True], ids=["plain", "jailer"])
def test_a_checkpoint_of_a_running_clone_restores_in_three_more_and_the_clone_runs_on(base, jailed):
    from dhg_kernel import checkpoint
    from dhg_kernel.vm import checkpoint_store as store

    layout, fc, _ = base
    backend = _jailed(layout, fc) if jailed else _backend(layout)
    base_snap = backend.base_snapshot()
    before = _digest(base_snap.mem)
    inst = _restore(backend)
    try:
        ck = checkpoint.save(backend, inst, None, "real-fc")  # pause, snapshot/create Full, resume: real
        assert [(m, p) for m, p, _ in inst.api.calls][-3:] == [("PATCH", "/vm"), ("PUT", "/snapshot/create"),
                                                               ("PATCH", "/vm")]
        assert _state(inst) == "Running"
        fcguest.guest_refuses(inst.vsock_path)  # it runs on after the save
        snap = backend.snapshot("real-fc")
        assert snap.mem.stat().st_size == base_snap.machine.ram_mb * 2**20
        with ThreadPoolExecutor(3) as pool:
            clones = list(pool.map(lambda _: _restore(backend, snap), range(3)))
        try:
            for c in clones:
                assert _state(c) == "Running"
                fcguest.guest_refuses(c.vsock_path)
        finally:
            for c in clones:
                c.stop()
        assert ck.describe()["name"] == "real-fc"
    finally:
        inst.stop()
        store.remove(layout, "real-fc")
    assert _digest(base_snap.mem) == before


# -- the jailer ------------------------------------------------------------------------------------


def _jailed(layout: Layout, fc):
    assert fc.jailer is not None, f"no jailer beside {fc.path}"
    return _backend(layout, jailer=str(fc.jailer), jailer_uid=NOBODY, jailer_gid=NOBODY)


def test_the_real_jailer_chroots_each_clone_as_its_own_user_and_stop_leaves_nothing(base):
    layout, fc, _ = base
    backend = _jailed(layout, fc)
    snap = backend.base_snapshot()
    clones = [_restore(backend, snap) for _ in range(2)]
    try:
        assert clones[0].root != clones[1].root
        for c in clones:
            root = c.root
            assert root == Path(c.dir) / "jail" / fc.path.name / c.id / "root"
            # Chrooted (pivot_root in a mount namespace of its own): its "/" is the jail and nothing else.
            seen_root = Path(f"/proc/{c.proc.pid}/root")
            assert sorted(os.listdir(seen_root)) == sorted(os.listdir(root)) and not (seen_root / "etc").exists()
            assert (seen_root / "api.sock").stat().st_ino == (root / "api.sock").stat().st_ino
            uids = Path(f"/proc/{c.proc.pid}/status").read_text().split("Uid:")[1].split()[:4]
            assert set(uids) == {str(NOBODY)}, uids  # privileges dropped
            for name, target in (("mem", snap.mem), ("vmstate", snap.vmstate), ("rootfs.ext4", snap.disks["rootfs"])):
                assert (root / name).stat().st_ino == target.stat().st_ino  # hard links, not copies
            assert (root / "dev" / "kvm").is_char_device()
            assert _state(c) == "Running"
            fcguest.guest_refuses(c.vsock_path)
        # The jail can read the snapshot but not write it.
        assert snap.mem.stat().st_gid == NOBODY and not snap.mem.stat().st_mode & 0o222
    finally:
        dirs = [Path(c.dir) for c in clones]
        pids = [c.proc.pid for c in clones]
        for c in clones:
            c.stop()
    assert not any(d.exists() for d in dirs)
    assert not any(Path(f"/proc/{p}").exists() for p in pids)


OWNER = """
import json, sys, time
sys.path.insert(0, {root!r})
from pathlib import Path
from dhg_kernel.config import Layout
from dhg_kernel.vm.firecracker import FirecrackerBackend, restore
b = FirecrackerBackend(Layout(Path({home!r})), firecracker={fc!r}, jailer={jailer!r}, jailer_uid={uid}, jailer_gid={uid})
inst = restore(b.layout, b.launcher(b.binary()), b.base_snapshot(), agent=False)
print(json.dumps({{"pid": inst.proc.pid, "dir": str(inst.dir)}}), flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize("jailed", [False, True], ids=["plain", "jailer"])
def test_a_clone_whose_owner_is_killed_9_is_reaped_within_seconds(base, jailed):
    layout, fc, _ = base
    code = OWNER.format(root=str(REPO), home=str(layout.home), fc=FC_PATH,
                        jailer=str(fc.jailer) if jailed else None, uid=NOBODY if jailed else "None")
    owner = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        line = owner.stdout.readline()
        assert line, "the owner did not start a clone"
        got = json.loads(line)
        assert Path(got["dir"]).is_dir() and Path(f"/proc/{got['pid']}").exists()
        os.kill(owner.pid, signal.SIGKILL)
        owner.wait()
        deadline = time.monotonic() + 15
        while (Path(got["dir"]).exists() or Path(f"/proc/{got['pid']}").exists()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not Path(f"/proc/{got['pid']}").exists(), "the Firecracker of a dead owner still runs"
        assert not Path(got["dir"]).exists(), "the run dir (and jail) of a dead owner is still there"
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()


# -- guest networking: the TAP in the instance's own namespace -------------------------------------


def _tun_iffs(pid: int) -> list[str]:
    """The TUN/TAP device names the process has attached (``iff:`` in its fds' fdinfo)."""
    out = []
    for fd in os.listdir(f"/proc/{pid}/fdinfo"):
        try:
            text = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
        except OSError:
            continue
        m = re.search(r"^iff:\s*(\S+)", text, re.M)
        if m:
            out.append(m.group(1))
    return out


@pytest.mark.parametrize("jailed", [False, True], ids=["plain", "jailer"])
def test_network_the_real_binary_attaches_the_tap_in_each_clone_namespace(parent_netns, tmp_path, jailed):
    from pyroute2 import NetNS

    from dhg_kernel.vm import netns

    layout, fc, meta = fcguest.make_home(tmp_path / "home", network=True, fc_path=FC_PATH, netns_parent=parent_netns)
    assert meta["machine"]["network"] is True
    backend = _jailed(layout, fc) if jailed else _backend(layout)
    backend.network = True
    backend.netns_parent = parent_netns
    snap = backend.base_snapshot()
    clones = []
    names: set[str] = set()
    try:
        for _ in range(2):
            clones.append(_restore(backend, snap, network=True, netns_parent=parent_netns))
        for c in clones:
            ns = c.record.info["network"]["netns"]
            names.add(ns)
            assert os.stat(f"/proc/{c.proc.pid}/ns/net").st_ino == os.stat(f"{netns.NETNS_RUN_DIR}/{ns}").st_ino
            assert _tun_iffs(c.proc.pid) == [netns.TAP_NAME]  # the real binary holds the TAP open
            with NetNS(ns) as ipr:
                link = ipr.link_lookup(ifname=netns.TAP_NAME)
                assert link, f"no {netns.TAP_NAME} in {ns}"
                assert ipr.get_links(link[0])[0].get_attr("IFLA_CARRIER") == 1  # attached: carrier up
            assert _state(c) == "Running"
            fcguest.guest_refuses(c.vsock_path)
            load = [b for _, p, b in c.api.calls if p == "/snapshot/load"][0]
            assert load.get("network_overrides") == [
                {"iface_id": "eth0", "host_dev_name": netns.TAP_NAME}]  # 1.12+: sent, and accepted
        assert len(names) == 2
    finally:
        for c in clones:
            c.stop()
        _destroy_all(layout)
    assert not any(os.path.exists(f"{netns.NETNS_RUN_DIR}/{n}") for n in names)


# -- what dhvm status says -------------------------------------------------------------------------


def test_dhvm_status_names_the_binary_and_every_check_that_passes_or_fails(base):
    from dhg_kernel.vm.host import probe_record

    layout, fc, _ = base
    version = ".".join(map(str, fc.version))

    def status() -> dict:
        p = subprocess.run([sys.executable, "-m", "dhg_kernel", "status", "--json", "--config-dir", str(layout.home),
                            "--firecracker", FC_PATH], capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, p.stderr
        return json.loads(p.stdout)["firecracker"]

    st = status()
    assert st["firecracker_version"] == version and st["firecracker"] == str(fc.path)
    checks = st["checks"]
    assert checks["kvm_create_vm"].startswith("ok:")
    assert checks["firecracker"].startswith("ok:") and version in checks["firecracker"]
    assert checks["firecracker_api"].startswith("ok:") and f"vmm_version {version}" in checks["firecracker_api"]
    assert checks["snapshot"].startswith("ok:")  # the test guest's snapshot, made by this binary
    assert checks["kvm_boots_guest"].startswith("not probed yet")
    # Once a probe boot has failed (as on this machine), status says so, with what the probe saw.
    assert probe_record(layout) == {}
    layout.accel_probe.write_text(json.dumps({"key": "k", "accel": "tcg", "detail": "it printed nothing"}))
    try:
        checks = status()["checks"]
    finally:
        layout.accel_probe.unlink()
    assert checks["kvm_boots_guest"].startswith("FAILED:") and "it printed nothing" in checks["kvm_boots_guest"]
    assert "dhvm prepare --backend qemu" in checks["kvm_boots_guest"]


def test_restores_run_under_the_jailer_and_user_that_prepare_recorded(tmp_path):
    from dhg_kernel.vm.base import write_snapshot_metadata
    from dhg_kernel.vm.firecracker import FcSnapshot

    layout, fc, meta = fcguest.make_home(tmp_path / "home", fc_path=FC_PATH)
    d = layout.firecracker_snapshots()
    write_snapshot_metadata(d, {**meta, "jailer": str(fc.jailer), "jailer_user": [NOBODY, NOBODY]})
    assert FcSnapshot.load_from(d, layout.vm).meta["jailer_user"] == [NOBODY, NOBODY]
    backend = _backend(layout)  # nothing about the jailer given here
    inst = _restore(backend)
    try:
        assert (Path(inst.dir) / "jail").is_dir()
        assert Path(f"/proc/{inst.proc.pid}/status").read_text().split("Uid:")[1].split()[0] == str(NOBODY)
        fcguest.guest_refuses(inst.vsock_path)
    finally:
        inst.stop()
        _destroy_all(layout)
