"""The Firecracker backend, proven by contract where no Firecracker can run.

- every request body, for every supported Firecracker version, against the official API spec;
- the cold-boot + snapshot and restore call sequences against a spec-validating API server that
  answers like Firecracker (and a stand-in ``firecracker`` executable built on it, so the whole
  restore path — processes, run dirs, hybrid vsock, clones, forwarding — runs for real);
- hybrid vsock against a peer that speaks the documented CONNECT/OK protocol;
- the release download against an HTTP server on 127.0.0.1 (never GitHub);
- network namespaces, veth, TAP and NAT for real (as root), including reaping after a crash;
- a real boot → snapshot → restore → cell, wherever Firecracker and a working /dev/kvm exist.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import os
import re
import socket
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import pytest

import fake_firecracker
from fake_firecracker import (FAKE_FC, LOAD_FIELD_SINCE, HybridVsockPeer, SpecServer, echo, fake_binary, mini_agent,
                              serve_api)

from dhg_kernel import protocol as P
from dhg_kernel.config import Layout

ROOT = Path(__file__).resolve().parents[2]
SPEC_PATH = Path(os.environ.get("DHG_FIRECRACKER_SPEC", ROOT.parent / "shared/firecracker/firecracker-v1.16.1.yaml"))
VERSIONS = [(1, minor, 0) for minor in range(8, 16)] + [(1, 16, 1)]

needs_spec = pytest.mark.skipif(not SPEC_PATH.is_file(), reason=f"Firecracker's API spec is not at {SPEC_PATH}")


# -- request bodies vs. the spec ------------------------------------------------------------------


def _machine(network=False):
    from dhg_kernel.vm.firecracker import FcMachine

    return FcMachine(kernel="kernel/vmlinux", initrd="kernel/initrd.img", rootfs="rootfs/r.ext4", ram_mb=2048,
                     vcpus=2, heap="1g", boot_args=FcMachine.kernel_cmdline("1g", "", network), network=network)


def _all_calls(version, network):
    from dhg_kernel.vm.firecracker import checkpoint_calls, cold_boot_calls, restore_calls, resume_calls, snapshot_calls

    return (cold_boot_calls(_machine(network), version) + snapshot_calls(version) + restore_calls(version, network)
            + checkpoint_calls(version) + resume_calls(version))


@needs_spec
@pytest.mark.parametrize("version", VERSIONS, ids=lambda v: ".".join(map(str, v)))
@pytest.mark.parametrize("network", [False, True], ids=["no-net", "net"])
def test_every_request_body_matches_the_official_spec_for_every_supported_version(version, network):
    import jsonschema

    server = SpecServer(SPEC_PATH, version)
    for call in _all_calls(version, network):
        route = next(r for r in server.routes if r[0] == call.method and r[1].match(call.path))
        assert route[2] == call.definition, f"{call.method} {call.path} takes {route[2]}, not {call.definition}"
        schema = {"$ref": f"#/definitions/{route[2]}", "definitions": server.definitions}
        jsonschema.validate(call.body, schema, cls=jsonschema.Draft4Validator)
    load = next(c.body for c in _all_calls(version, network) if c.path == "/snapshot/load")
    for field, since in LOAD_FIELD_SINCE.items():
        if version[:2] < since:
            assert field not in load, f"{field} sent to Firecracker {version}"
    assert load["mem_backend"] == {"backend_type": "File", "backend_path": "mem"}
    assert ("vsock_override" in load) == (version[:2] >= (1, 16))
    assert ("network_overrides" in load) == (network and version[:2] >= (1, 12))


@needs_spec
def test_bodies_also_match_the_release_spec_kept_beside_the_binary(tmp_path):
    from dhg_kernel.vm.fc_api import Spec, spec_beside
    from dhg_kernel.vm.fc_release import obtain

    found = []
    try:
        fc = obtain(Layout.resolve(None), allow_download=False)
        found = [fc.spec or spec_beside(fc.path)]
    except Exception:  # noqa: BLE001 - no binary here: nothing beside it to check
        pass
    found = [p for p in found if p]
    if not found:
        pytest.skip("no Firecracker release (with its own firecracker_spec-*.yaml) is installed here")
    spec = Spec.load(found[0])
    for call in _all_calls(spec.version, True):
        if call.definition:
            spec.for_version(spec.version).validate(call.definition, call.body)


@needs_spec
def test_spec_client_rejects_unknown_and_too_new_fields_before_sending():
    from dhg_kernel.vm.fc_api import Spec, SpecError, _check_fields_known

    spec = Spec.load(SPEC_PATH)
    assert spec.version == (1, 16, 1)
    spec.validate("Vsock", {"guest_cid": 3, "uds_path": "v.sock"})
    with pytest.raises(SpecError, match="Additional properties"):
        spec.validate("Vsock", {"guest_cid": 3, "uds_path": "v.sock", "bogus": 1})
    with pytest.raises(SpecError, match="guest_cid"):
        spec.validate("Vsock", {"guest_cid": 2, "uds_path": "v.sock"})  # CIDs below 3 are reserved
    old = spec.for_version((1, 15, 0))
    body = {"snapshot_path": "s", "mem_backend": {"backend_type": "File", "backend_path": "m"},
            "vsock_override": {"uds_path": "v"}}
    spec.validate("SnapshotLoadParams", body)
    with pytest.raises(SpecError):
        old.validate("SnapshotLoadParams", body)
    with pytest.raises(SpecError, match="needs Firecracker ≥ 1.16"):
        _check_fields_known((1, 15, 0), "SnapshotLoadParams", body)


# -- call sequences against the spec-validating server --------------------------------------------


@pytest.fixture
def api_server(tmp_path):
    servers = []

    def make(version=(1, 16, 1)):
        from dhg_kernel.vm.fc_api import FirecrackerAPI, Spec

        srv = SpecServer(SPEC_PATH, version)
        path = tmp_path / f"api-{len(servers)}.sock"
        servers.append(serve_api(srv, str(path)))
        api = FirecrackerAPI(path, version, Spec.load(SPEC_PATH).for_version(version))
        api.wait_ready()
        return srv, api

    cwd = os.getcwd()
    os.chdir(tmp_path)  # the server writes snapshot files relative to its cwd, like Firecracker
    yield make
    os.chdir(cwd)
    for s in servers:
        s.shutdown()
        s.server_close()


@needs_spec
@pytest.mark.parametrize("version", [(1, 10, 0), (1, 16, 1)], ids=["1.10", "1.16"])
def test_cold_boot_and_snapshot_call_sequence_is_what_firecracker_accepts(api_server, version):
    from dhg_kernel.vm.firecracker import cold_boot_calls, send, snapshot_calls

    srv, api = api_server(version)
    send(api, cold_boot_calls(_machine(network=True), version))
    send(api, snapshot_calls(version))
    order = [(m, p) for m, p, _ in srv.calls]
    assert order == [("PUT", "/logger"), ("PUT", "/machine-config"), ("PUT", "/boot-source"), ("PUT", "/drives/rootfs"),
                     ("PUT", "/vsock"), ("PUT", "/entropy"), ("PUT", "/network-interfaces/eth0"), ("PUT", "/actions"),
                     ("PATCH", "/vm"), ("PUT", "/snapshot/create")]
    bodies = {p: b for _, p, b in srv.calls}
    assert bodies["/boot-source"]["kernel_image_path"] == "vmlinux" and bodies["/boot-source"]["initrd_path"] == "initrd.img"
    assert "dhg.transport=vsock" in bodies["/boot-source"]["boot_args"]
    assert "dhg.vsock_port=52" in bodies["/boot-source"]["boot_args"]
    assert bodies["/drives/rootfs"] == {"drive_id": "rootfs", "path_on_host": "rootfs.ext4", "is_root_device": True,
                                        "is_read_only": True}
    assert bodies["/vsock"] == {"guest_cid": 3, "uds_path": "vsock.sock"}
    assert bodies["/snapshot/create"] == {"snapshot_type": "Full", "snapshot_path": "vmstate", "mem_file_path": "mem"}
    assert srv.state == "Paused"


@needs_spec
@pytest.mark.parametrize("version", [(1, 8, 0), (1, 12, 0), (1, 16, 1)], ids=["1.8", "1.12", "1.16"])
def test_restore_call_sequence_loads_the_snapshot_on_a_fresh_process(api_server, version):
    from dhg_kernel.vm.firecracker import restore_calls, send

    srv, api = api_server(version)
    send(api, restore_calls(version, network=True))
    assert [(m, p) for m, p, _ in srv.calls] == [("PUT", "/logger"), ("PUT", "/snapshot/load")]
    load = srv.calls[-1][2]
    assert load["resume_vm"] is True and srv.state == "Running"
    assert load.get("clock_realtime") is (True if version >= (1, 16) else None)


@needs_spec
def test_error_replies_become_actionable_errors(api_server):
    from dhg_kernel.vm.fc_api import FirecrackerAPIError
    from dhg_kernel.vm.firecracker import cold_boot_calls, restore_calls, send

    srv, api = api_server((1, 14, 0))
    srv.fail["/snapshot/load"] = ("Load snapshot error: Failed to restore from snapshot: Failed to get snapshot "
                                  "state from file: Invalid data version")
    with pytest.raises(FirecrackerAPIError) as e:
        send(api, restore_calls((1, 14, 0), False))
    msg = str(e.value)
    assert "PUT /snapshot/load" in msg and "Invalid data version" in msg
    assert "dhvm prepare --backend firecracker --rebuild" in msg
    # A body the server refuses on its own (configuring after a load): its fault_message comes through.
    srv.fail.clear()
    send(api, restore_calls((1, 14, 0), False)[1:])
    with pytest.raises(FirecrackerAPIError, match="not supported after starting"):
        send(api, cold_boot_calls(_machine(), (1, 14, 0))[1:2])


# -- hybrid vsock ---------------------------------------------------------------------------------


def test_vsock_handshake_then_a_real_frame_stream_hello_round_trip(tmp_path):
    from dhg_kernel.vm import vsock

    peer = HybridVsockPeer(tmp_path / "v.sock")
    peer.listeners[52] = mini_agent
    sock = vsock.connect(tmp_path / "v.sock", 52, timeout=5)
    stream = P.FrameStream(sock)
    stream.send({"op": P.OP_HELLO, "id": 1, "version": P.PROTOCOL_VERSION})
    h = stream.recv(timeout=5).header
    assert h["ev"] == P.EV_DONE and h["re"] == 1 and h["version"] == P.PROTOCOL_VERSION
    assert peer.connects == [52]
    sock.close()
    peer.close()


def test_vsock_connect_retries_until_the_guest_listens(tmp_path):
    from dhg_kernel.vm import vsock

    path = tmp_path / "v.sock"
    box = {}

    def later():  # Firecracker's socket appears late, and the guest listener later still
        time.sleep(0.3)
        box["peer"] = HybridVsockPeer(path)
        time.sleep(0.3)
        box["peer"].listeners[52] = echo

    threading.Thread(target=later, daemon=True).start()
    t0 = time.monotonic()
    sock = vsock.connect(path, 52, timeout=10)
    assert 0.5 < time.monotonic() - t0 < 5
    assert box["peer"].connects.count(52) >= 2  # refused (closed) at least once, then OK
    sock.sendall(b"ping")
    assert sock.recv(4) == b"ping"
    sock.close()
    box["peer"].close()


def test_vsock_closed_connection_is_reported_as_agent_not_listening(tmp_path):
    from dhg_kernel.vm import vsock

    peer = HybridVsockPeer(tmp_path / "v.sock")
    with pytest.raises(vsock.VsockNotListening, match="agent not listening on guest vsock port 52"):
        vsock.connect(tmp_path / "v.sock", 52, timeout=0.5)
    peer.close()


def test_port_forwarder_carries_tcp_clients_to_the_guest_port(tmp_path):
    from dhg_kernel.vm import vsock

    peer = HybridVsockPeer(tmp_path / "v.sock")
    peer.listeners[10000] = echo
    fwd = vsock.PortForwarder(tmp_path / "v.sock", 10000)
    assert fwd.host == "127.0.0.1"
    results = []

    def client(i):
        with socket.create_connection(("127.0.0.1", fwd.port), timeout=5) as c:
            payload = os.urandom(200_000) + bytes([i])
            c.sendall(payload)
            c.shutdown(socket.SHUT_WR)
            got = b""
            while chunk := c.recv(65536):
                got += chunk
            results.append(got == payload)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert results == [True] * 4
    assert peer.connects.count(10000) == 4  # one hybrid-vsock connection per TCP client
    fwd.close()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", fwd.port), timeout=1).recv(1) or (_ for _ in ()).throw(OSError())
    peer.close()


# -- download and verification (127.0.0.1 only) ---------------------------------------------------



def _release_tarball(version: str, spec: bytes) -> bytes:
    t = f"v{version}"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data, mode in ((f"release-{t}-x86_64/firecracker-{t}-x86_64", FAKE_FC.format(v=version).encode(), 0o755),
                                 (f"release-{t}-x86_64/jailer-{t}-x86_64", b"#!/bin/sh\n", 0o755),
                                 (f"release-{t}-x86_64/firecracker_spec-{t}.yaml", spec, 0o644),
                                 ("../../evil", b"must not land anywhere", 0o644)):
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), mode
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.fixture
def release_server(tmp_path, monkeypatch):
    """An HTTP server on 127.0.0.1 laid out like the GitHub releases download URL."""
    root = tmp_path / "www"
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(root), **k)  # noqa: E731
    http.server.SimpleHTTPRequestHandler.log_message = lambda *a: None
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    monkeypatch.setenv("DHG_FIRECRACKER_RELEASES", f"http://127.0.0.1:{srv.server_address[1]}")

    def publish(version="1.16.1", corrupt=False):
        t = f"v{version}"
        d = root / t
        d.mkdir(parents=True, exist_ok=True)
        data = _release_tarball(version, SPEC_PATH.read_bytes() if SPEC_PATH.is_file() else b"swagger: '2.0'\n")
        (d / f"firecracker-{t}-x86_64.tgz").write_bytes(data)
        digest = hashlib.sha256(data + (b"x" if corrupt else b"")).hexdigest()
        (d / f"firecracker-{t}-x86_64.tgz.sha256.txt").write_text(f"{digest}  firecracker-{t}-x86_64.tgz\n")

    yield publish
    srv.shutdown()
    srv.server_close()


def test_download_verifies_the_checksum_and_keeps_the_release_spec(release_server, tmp_path):
    from dhg_kernel.vm.fc_release import binary_version, cached, download, obtain

    release_server()
    layout = Layout(tmp_path / "home")
    fc = download(layout, "1.16.1")
    d = layout.vm / "firecracker" / "v1.16.1"
    assert fc.path == d / "firecracker" and fc.jailer == d / "jailer" and fc.spec == d / "firecracker_spec-v1.16.1.yaml"
    assert binary_version(fc.path) == (1, 16, 1) and fc.version == (1, 16, 1)
    assert sorted(p.name for p in d.iterdir()) == ["SOURCE", "firecracker", "firecracker_spec-v1.16.1.yaml", "jailer"]
    assert not list(tmp_path.rglob("evil"))  # paths inside the tarball are never trusted
    assert cached(layout, "1.16.1") is not None
    if not any(Path(p, "firecracker").exists() for p in os.environ.get("PATH", "").split(os.pathsep)):
        assert obtain(layout, allow_download=False).path == fc.path


def test_download_refuses_a_checksum_mismatch(release_server, tmp_path):
    from dhg_kernel.vm.fc_release import FirecrackerMissing, download

    release_server(corrupt=True)
    layout = Layout(tmp_path / "home")
    with pytest.raises(FirecrackerMissing, match="checksum mismatch.*refusing"):
        download(layout, "1.16.1")
    assert not (layout.vm / "firecracker" / "v1.16.1").exists()


def test_download_offline_names_the_url_and_the_manual_step(tmp_path, monkeypatch):
    from dhg_kernel.vm.fc_release import FirecrackerMissing, download

    with socket.socket() as s:  # a port that nothing listens on: "offline"
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("DHG_FIRECRACKER_RELEASES", f"http://127.0.0.1:{port}")
    with pytest.raises(FirecrackerMissing) as e:
        download(Layout(tmp_path / "home"), "1.16.1")
    msg = str(e.value)
    assert f"http://127.0.0.1:{port}/v1.16.1/firecracker-v1.16.1-x86_64.tgz" in msg
    assert "sha256sum -c" in msg and "--firecracker /path/to/" in msg


def test_a_binary_given_by_hand_is_checked_for_its_version(tmp_path):
    from dhg_kernel.vm.fc_release import FirecrackerMissing, from_path

    old = tmp_path / "firecracker"
    old.write_text(FAKE_FC.format(v="1.7.0"))
    old.chmod(0o755)
    with pytest.raises(FirecrackerMissing, match="needs ≥ 1.8.0"):
        from_path(old)
    old.write_text(FAKE_FC.format(v="1.13.2"))
    assert from_path(old).version == (1, 13, 2)


# -- the whole restore path, against a stand-in firecracker executable ----------------------------


@pytest.fixture
def stand_in(tmp_path):
    def make(version="1.16.1"):
        return fake_firecracker.stand_in(tmp_path, version, SPEC_PATH)
    return make


def _fake_snapshot(layout: Layout, version: str):
    """A snapshot directory as prepare writes it (files are stand-ins; the metadata is real)."""
    from dhg_kernel.vm.fc_api import parse_version
    from dhg_kernel.vm.fc_release import FirecrackerBinary
    from dhg_kernel.vm.base import write_snapshot_metadata
    from dhg_kernel.vm.firecracker import new_snapshot_meta

    rootfs = layout.vm / "rootfs" / "rootfs-42.7.ext4"
    rootfs.parent.mkdir(parents=True)
    rootfs.write_bytes(b"ext4")
    d = layout.firecracker_snapshots()
    d.mkdir(parents=True)
    for name in ("vmstate", "mem"):
        (d / name).write_bytes(os.urandom(4096))
        (d / name).chmod(0o400)
    m = _machine()
    m.rootfs = "rootfs/rootfs-42.7.ext4"
    meta = new_snapshot_meta(FirecrackerBinary(Path("/nonexistent"), parse_version(version)), m, layout.vm)
    write_snapshot_metadata(d, meta)
    return d


@needs_spec
@pytest.mark.parametrize("version", ["1.16.1", "1.11.0"])
def test_clones_restore_at_once_each_with_its_own_vsock_and_never_write_the_snapshot(tmp_path, stand_in, version):
    from dhg_kernel.instances import list_instances
    from dhg_kernel.vm.firecracker import FirecrackerBackend

    layout = Layout(tmp_path / "home")
    snap_dir = _fake_snapshot(layout, version)
    before = {n: (snap_dir / n).stat().st_mtime_ns for n in ("vmstate", "mem")}
    mem_hash = hashlib.sha256((snap_dir / "mem").read_bytes()).hexdigest()
    backend = FirecrackerBackend(layout, firecracker=str(stand_in(version)))
    insts = []
    threads = [threading.Thread(target=lambda: insts.append(backend.start())) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    try:
        assert len(insts) == 3
        assert len({i.vsock_path for i in insts}) == 3 and all(i.vsock_path.is_socket() for i in insts)
        for inst in insts:
            assert inst.restored_info["entropy_bytes"] == 64
            calls = json.loads((inst.root / "calls.json").read_text())
            load = calls[-1][2]
            assert ("vsock_override" in load) == (version == "1.16.1")
            assert os.readlink(inst.root / "mem") == str(snap_dir / "mem")
            # The agent stream made during restore is handed over, then new ones can be made.
            s1, s2 = inst.connect(5), inst.connect(5)
            for s in (s1, s2):
                stream = P.FrameStream(s)
                stream.send({"op": P.OP_HELLO, "id": 7, "version": P.PROTOCOL_VERSION})
                assert stream.recv(timeout=5).header["re"] == 7
                s.close()
            with socket.create_connection(("127.0.0.1", inst.forwarder.port), timeout=5) as c:
                c.sendall(b"deephaven")
                assert c.recv(9) == b"deephaven"
            d = inst.describe()
            assert d["deephaven_port"] == inst.forwarder.address and d["alive"]
        assert {r.id for r in list_instances(layout)} == {i.id for i in insts}
    finally:
        for inst in insts:
            inst.stop()
    assert list_instances(layout) == []
    assert {n: (snap_dir / n).stat().st_mtime_ns for n in ("vmstate", "mem")} == before
    assert hashlib.sha256((snap_dir / "mem").read_bytes()).hexdigest() == mem_hash


@needs_spec
def test_a_failed_restore_says_what_failed_shows_the_logs_and_leaves_no_instance(tmp_path, stand_in, monkeypatch):
    """The restore skeleton's one error path (vm/restore.py), through Firecracker's hooks."""
    from dhg_kernel.errors import AgentStartError
    from dhg_kernel.instances import list_instances
    from dhg_kernel.vm.firecracker import FirecrackerBackend

    layout = Layout(tmp_path / "home")
    snap_dir = _fake_snapshot(layout, "1.16.1")
    monkeypatch.setenv("FAKE_FIRECRACKER_FAIL", json.dumps({"/snapshot/load": "Load snapshot error: Invalid data version"}))
    backend = FirecrackerBackend(layout, firecracker=str(stand_in("1.16.1")))
    with pytest.raises(AgentStartError) as e:
        backend.start()
    msg = str(e.value)
    assert msg.startswith(f"Firecracker restore from {snap_dir} failed: ")
    assert "PUT /snapshot/load" in msg and "Invalid data version" in msg
    assert "--- guest console / firecracker.log ---" in msg and "stand-in firecracker started" in msg
    assert msg.rstrip().endswith("If the snapshot is stale, run: dhvm prepare --backend firecracker --rebuild")
    assert list_instances(layout) == [] and not any(layout.run.iterdir())


@needs_spec
def test_a_snapshot_from_another_firecracker_version_is_refused_with_the_fix(tmp_path, stand_in):
    from dhg_kernel.vm.base import BackendUnavailable
    from dhg_kernel.vm.firecracker import FirecrackerBackend

    layout = Layout(tmp_path / "home")
    _fake_snapshot(layout, "1.15.0")
    backend = FirecrackerBackend(layout, firecracker=str(stand_in("1.16.1")))
    with pytest.raises(BackendUnavailable, match=r"made by Firecracker 1\.15\.0.*1\.16\.1.*--rebuild"):
        backend.start()
    checks = {c.name: c for c in backend.checks()}
    assert checks["firecracker"].ok and not checks["snapshot"].ok


# -- prerequisite checks --------------------------------------------------------------------------


def test_prerequisite_checks_say_how_to_fix_each_failure(tmp_path):
    from dhg_kernel.vm import why_not
    from dhg_kernel.vm.firecracker import FirecrackerBackend
    from dhg_kernel.vm.host import kvm_create_vm

    layout = Layout(tmp_path / "home")
    checks = FirecrackerBackend(layout).checks()
    names = [c.name for c in checks]
    assert names[:2] == ["linux", "kvm_access"] and "firecracker" in names and "snapshot" in names
    for c in checks:
        if not c.ok:
            assert c.fix or "run:" in c.detail or "--firecracker" in c.detail, c
    reason = why_not("firecracker", layout)
    assert reason and reason.split(":")[0] in names
    if os.access("/dev/kvm", os.R_OK | os.W_OK):
        ok, detail = kvm_create_vm()
        assert "KVM" in detail


def test_a_binary_that_does_not_serve_its_api_fails_its_check_with_what_it_said(tmp_path):
    from dhg_kernel.vm.fc_release import from_path
    from dhg_kernel.vm.firecracker import api_check

    exe = tmp_path / "firecracker"
    exe.write_text('#!/bin/sh\nif [ "$1" = --version ]; then echo "Firecracker v1.12.1"; exit 0; fi\n'
                   'echo "boom: cannot open /dev/kvm"; exit 1\n')
    exe.chmod(0o755)
    before = set(os.listdir("/tmp"))
    check = api_check(from_path(exe))
    assert not check.ok and check.name == "firecracker_api"
    assert "did not serve its API" in check.detail and "boom: cannot open /dev/kvm" in check.detail
    assert "--api-sock" in check.fix
    assert not [d for d in set(os.listdir("/tmp")) - before if d.startswith("dhg-fc-check-")]  # cleaned up
    # Choosing a backend (every session start) does not run the binary; dhvm status does.
    from dhg_kernel.vm.firecracker import FirecrackerBackend

    backend = FirecrackerBackend(Layout(tmp_path / "home"), firecracker=str(exe))
    assert "firecracker_api" not in [c.name for c in backend.checks()]
    assert backend.describe()["checks"]["firecracker_api"].startswith("FAILED:")


def test_init_and_backend_agree_on_the_agent_vsock_port():
    from dhg_kernel.vm.firecracker import AGENT_VSOCK_PORT, FcMachine

    init = (ROOT / "guest" / "init").read_text()
    assert re.search(r"^VSOCK_PORT = (\d+)$", init, re.M).group(1) == str(AGENT_VSOCK_PORT)
    assert f"dhg.vsock_port={AGENT_VSOCK_PORT}" in FcMachine.kernel_cmdline("1g")
    assert "dhg.transport=vsock" in FcMachine.kernel_cmdline("1g")


# -- guest networking (real, as root, inside namespaces the test creates) --------------------------


def test_network_plumbing_is_created_then_torn_down(parent_netns, tmp_path):
    from dhg_kernel.vm import netns

    plan = netns.setup("firecracker-0123456789", tmp_path, parent_netns)
    try:
        assert netns.exists(plan) == {"netns": True, "veth": True, "tap": True, "nat": True}
        # Traffic only between the test's own namespaces: the instance namespace reaches its parent end.
        code = (f"import socket; s=socket.create_server(('{plan.host_ip}', 5555)); c, _ = s.accept(); "
                "print(c.recv(5).decode())")
        srv = subprocess.Popen([sys.executable, "-c", code], preexec_fn=lambda: netns.enter(parent_netns),
                               stdout=subprocess.PIPE, text=True)
        time.sleep(0.5)
        netns._run_in(plan.netns, [sys.executable, "-c", f"import socket; socket.create_connection(('{plan.host_ip}', "
                                                         "5555), timeout=5).send(b'hello')"])
        assert srv.communicate(timeout=10)[0].strip() == "hello"
    finally:
        netns.teardown(plan)
    assert netns.exists(plan) == {"netns": False, "veth": False, "tap": False, "nat": False}


def test_network_plumbing_of_a_crashed_owner_is_removed_by_the_reaper(parent_netns, tmp_path):
    from dhg_kernel.instances import list_instances, new_instance, reap_stale
    from dhg_kernel.vm import netns

    layout = Layout(tmp_path / "home")
    rec = new_instance(layout, "firecracker")
    plan = netns.setup(rec.id, layout.run, parent_netns)
    rec.info["cleanup"] = [plan.cleanup_item()]
    # The owner "crashes": a process that is gone now.
    dead = subprocess.Popen(["true"])
    dead.wait()
    rec.owner_pid, rec.owner_start_time = dead.pid, 1
    rec.save()
    assert netns.exists(plan)["tap"]
    assert reap_stale(layout) == [rec.id]
    assert netns.exists(plan) == {"netns": False, "veth": False, "tap": False, "nat": False}
    assert list_instances(layout) == []


# -- prepare, here: the image is built, the snapshot needs KVM + firecracker ------------------------


@pytest.mark.qemu
def test_prepare_builds_the_image_then_names_the_failing_firecracker_check(qemu_home, monkeypatch):
    from dhg_kernel.prepare import PrepareError, prepare
    from dhg_kernel.vm.firecracker import FirecrackerBackend

    layout = Layout(qemu_home)
    if FirecrackerBackend(layout).why_not() is None:
        pytest.skip("Firecracker can run here; the real boot test covers prepare")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("DHG_FIRECRACKER_RELEASES", f"http://127.0.0.1:{port}")  # offline: never GitHub
    monkeypatch.setenv("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
    with pytest.raises(PrepareError) as e:
        prepare(layout, backend="firecracker", progress=lambda m: None)
    msg = str(e.value)
    assert "the image is built" in msg and "needs Linux + a working /dev/kvm + firecracker" in msg
    assert re.search(r"the check '(\w+)' failed", msg)
    assert "firecracker-v1.16.1-x86_64.tgz" in msg  # the binary's own failure is listed too


# -- a real microVM, wherever Firecracker and a working KVM exist ---------------------------------


def test_real_boot_snapshot_restore_and_a_cell(tmp_path):
    from dhg_kernel.vm.fc_release import FirecrackerMissing, obtain
    from dhg_kernel.vm.host import host_checks

    home = Path(os.environ.get("DHG_TEST_HOME", "~/.dhg-test")).expanduser()
    layout = Layout(home)
    failed = [c for c in host_checks(layout) if not c.ok]
    if failed:
        pytest.skip(f"Firecracker cannot boot a guest here: {failed[0].name}: {failed[0]}")
    try:
        obtain(layout, allow_download=False)
    except FirecrackerMissing as e:
        pytest.skip(f"no firecracker binary here: {str(e).splitlines()[0]}")
    from dhg_kernel.prepare import prepare
    from dhg_kernel.session import Session

    prepare(layout, backend="firecracker", progress=lambda m: print(f"[prepare] {m}", file=sys.stderr))
    s = Session("firecracker", home)
    try:
        t0 = time.monotonic()
        r = s.execute("print(6 * 7)\nfrom deephaven import empty_table\nt = empty_table(3).update('X = i')")
        assert r.ok, r.error
        assert r.stdout.strip() == "42" and r.tables and r.tables[0].rows == 3
        print(f"restore + first cell: {time.monotonic() - t0:.2f}s", file=sys.stderr)
    finally:
        s.stop()


# -- checkpoints: a running clone saved, and VMs started from it -----------------------------------


@needs_spec
@pytest.mark.parametrize("version", [(1, 10, 0), (1, 16, 1)], ids=["1.10", "1.16"])
def test_checkpoint_call_sequence_pauses_writes_a_full_snapshot_of_its_own_and_resumes(api_server, version):
    from dhg_kernel.vm.firecracker import MEM_NAME, VMSTATE_NAME, checkpoint_calls, restore_calls, resume_calls, send

    srv, api = api_server(version)
    send(api, restore_calls(version, network=False))  # a clone, running
    srv.calls.clear()
    send(api, checkpoint_calls(version) + resume_calls(version))
    assert [(m, p) for m, p, _ in srv.calls] == [("PATCH", "/vm"), ("PUT", "/snapshot/create"), ("PATCH", "/vm")]
    pause, create, resume = (b for _, _, b in srv.calls)
    assert pause == {"state": "Paused"} and resume == {"state": "Resumed"} and srv.state == "Running"
    assert create["snapshot_type"] == "Full"
    # A clone's root links vmstate and mem to the snapshot it was restored from: never written through.
    assert {create["snapshot_path"], create["mem_file_path"]}.isdisjoint({VMSTATE_NAME, MEM_NAME})


def _recording_api(version: tuple, faults: dict):
    """Stands in for the API *client*, not for Firecracker: each body is checked against the official spec
    exactly as FirecrackerAPI checks it, then recorded; a call in ``faults`` ((method, path, body's
    state)) gets that fault_message back, as FirecrackerAPI raises it."""
    from dhg_kernel.vm.fc_api import FirecrackerAPI, FirecrackerAPIError, Spec

    class RecordingAPI:
        check = FirecrackerAPI.check

        def __init__(self):
            self.version, self.spec, self.calls = version, Spec.load(SPEC_PATH).for_version(version), []

        def request(self, method, path, body):
            self.calls.append((method, path, body))
            fault = faults.get((method, path, (body or {}).get("state")))
            if fault:
                raise FirecrackerAPIError(method, path, 400, fault)

        def close(self):
            pass

    return RecordingAPI()


def _clone(layout: Layout, backend, api):
    """A FirecrackerInstance as restore() leaves it (its run dir, a root linking the base snapshot's files)
    talking to ``api``; its process has already ended (nothing here needs it)."""
    from dhg_kernel.instances import new_instance
    from dhg_kernel.vm.firecracker import FirecrackerInstance, Launcher

    snap = backend.base_snapshot()
    rec = new_instance(layout, "firecracker")
    launcher = Launcher(backend.binary())
    root = launcher.root(rec)
    launcher.populate(root, {"vmstate": snap.vmstate, "mem": snap.mem, "rootfs.ext4": snap.disks["rootfs"]})
    proc = subprocess.Popen(["true"])
    proc.wait()
    inst = FirecrackerInstance(rec, proc, root, snap)
    inst.api = api
    return inst


@needs_spec
@pytest.mark.parametrize("resume_refused", [False, True], ids=["resumed", "resume-refused-too"])
def test_a_checkpoint_firecracker_cannot_write_still_resumes_the_vm_and_says_why(tmp_path, resume_refused):
    from dhg_kernel.errors import CheckpointError
    from dhg_kernel.vm.firecracker import CHECKPOINT_MEM_NAME, FirecrackerBackend

    layout = Layout(tmp_path / "home")
    _fake_snapshot(layout, "1.16.1")
    backend = FirecrackerBackend(layout, firecracker=str(fake_binary(tmp_path, "1.16.1")))
    faults = {("PUT", "/snapshot/create", None): "Create snapshot error: Cannot perform write on the memory backing "
                                                 "file: No space left on device (os error 28)"}
    if resume_refused:
        faults[("PATCH", "/vm", "Resumed")] = "The requested operation is not supported: the microVM is gone."
    api = _recording_api((1, 16, 1), faults)
    inst = _clone(layout, backend, api)
    work = tmp_path / "work"
    work.mkdir()
    (inst.root / CHECKPOINT_MEM_NAME).write_bytes(b"half of an earlier save")
    try:
        assert backend.can_checkpoint and backend.checkpoint_bytes(inst) == 2048 * 2**20
        with pytest.raises(CheckpointError) as e:
            backend.checkpoint(inst, work)
        assert [(m, p, b.get("state")) for m, p, b in api.calls] == [
            ("PATCH", "/vm", "Paused"), ("PUT", "/snapshot/create", None), ("PATCH", "/vm", "Resumed")]
        assert api.calls[1][2]["snapshot_type"] == "Full"
        msg = str(e.value)
        assert "could not save the VM (PUT /snapshot/create: Create snapshot error" in msg
        assert "No space left on device" in msg
        if resume_refused:
            assert "did not resume it (PATCH /vm: " in msg and "the microVM is gone" in msg and "restart" in msg
        else:
            assert "the VM runs on" in msg
        assert list(work.iterdir()) == []
        assert not (inst.root / CHECKPOINT_MEM_NAME).exists()
        assert os.readlink(inst.root / "mem") == str(layout.firecracker_snapshots() / "mem")
    finally:
        inst.stop()


def _fake_checkpoint(layout: Layout, name: str, base_dir: Path, backend: str = "firecracker",
                     base_key: str | None = None) -> Path:
    """A checkpoint directory as dhg_kernel/checkpoint.py leaves one: the files of a ``backend`` snapshot
    (stand-ins) and its metadata, grown from the base snapshot in ``base_dir`` (or one keyed ``base_key``)."""
    from dhg_kernel.config import DH_VERSION
    from dhg_kernel.vm.base import write_snapshot_metadata

    base = json.loads((base_dir / "metadata.json").read_text())
    d = layout.checkpoint(name)
    d.mkdir(parents=True)
    for f in ("vmstate", "mem") if backend == "firecracker" else ("state", "mem"):
        (d / f).write_bytes(os.urandom(4096))
        (d / f).chmod(0o600)
    meta = {**base, "backend": backend, "dh_version": DH_VERSION,
            "checkpoint": {"name": name, "created": "2025-01-02T03:04:05+00:00", "tables": ["t"],
                           "base": {"key": base_key or base.get("key"), "created": base.get("created")}}}
    write_snapshot_metadata(d, meta)
    return d


def _keyed(base_dir: Path, key: str) -> None:
    """Give a fake base snapshot the input key prepare gives a real one."""
    from dhg_kernel.vm.base import write_snapshot_metadata

    meta = json.loads((base_dir / "metadata.json").read_text())
    write_snapshot_metadata(base_dir, {**meta, "key": key})


def test_a_checkpoint_from_another_backend_or_an_older_base_is_refused_with_the_fix(tmp_path):
    from dhg_kernel.errors import CheckpointError
    from dhg_kernel.instances import list_instances
    from dhg_kernel.vm.firecracker import FirecrackerBackend

    layout = Layout(tmp_path / "home")
    base = _fake_snapshot(layout, "1.16.1")
    _keyed(base, "prepare-2")
    _fake_checkpoint(layout, "from-qemu", base, backend="qemu")
    _fake_checkpoint(layout, "stale", base, base_key="prepare-1")
    fc = str(fake_binary(tmp_path, "1.16.1"))
    backend = FirecrackerBackend(layout, firecracker=fc)
    fix = r"Dhvm\.backend = 'qemu', or --backend qemu\).*dhvm checkpoint rm from-qemu"
    with pytest.raises(CheckpointError, match=r"'from-qemu' was made with the qemu backend.*uses firecracker.*" + fix):
        backend.start("from-qemu")
    with pytest.raises(CheckpointError, match=fix):  # chosen for every VM (Dhvm.start_from), checked when chosen
        backend.snapshot("from-qemu")
    with pytest.raises(CheckpointError, match=fix):
        FirecrackerBackend(layout, firecracker=fc, start_from="from-qemu").start()
    with pytest.raises(CheckpointError, match=r"'stale' grew from the base snapshot.*`dhvm prepare` has since made a "
                                              r"new one.*dhvm checkpoint rm stale"):
        backend.start("stale")
    assert list_instances(layout) == []


@needs_spec
def test_start_from_a_checkpoint_restores_its_files_as_the_base_is_and_never_writes_them(tmp_path, stand_in):
    from dhg_kernel.instances import list_instances
    from dhg_kernel.vm.firecracker import FirecrackerBackend

    layout = Layout(tmp_path / "home")
    base = _fake_snapshot(layout, "1.16.1")
    _keyed(base, "prepare-1")
    ck = _fake_checkpoint(layout, "loaded", base)
    digest = {d / n: hashlib.sha256((d / n).read_bytes()).hexdigest() for d in (base, ck) for n in ("vmstate", "mem")}
    backend = FirecrackerBackend(layout, firecracker=str(stand_in("1.16.1")), start_from="loaded")
    for start_from, expected in (("loaded", ck), (None, base)):
        backend.start_from = start_from
        inst = backend.start()
        try:
            for n in ("vmstate", "mem"):
                assert os.readlink(inst.root / n) == str(expected / n)
            load = json.loads((inst.root / "calls.json").read_text())[-1][2]
            assert load["mem_backend"] == {"backend_type": "File", "backend_path": "mem"} and load["resume_vm"]
            assert inst.restored_info["entropy_bytes"] == 64  # the restore's handshake, as from the base
            assert inst.describe()["snapshot"] == str(expected)
            assert backend.describe().get("start_from") == start_from
        finally:
            inst.stop()
    assert list_instances(layout) == []
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in digest} == digest
