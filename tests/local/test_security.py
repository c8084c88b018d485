"""Another local user (uid 65534, "nobody") against a user's kernel and DHG_HOME.

The "Deephaven microVM" kernel's channels: the other user is given the kernel's address (what
``ps`` or a port scan would tell) and tries to subscribe to iopub and reach shell while the owner
runs a cell; it must receive nothing, and the owner everything. DHG_HOME: after a real session ran,
the other user tries to list, read or connect to everything under it.
"""

from __future__ import annotations

import json
import os
import secrets
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

NOBODY = 65534
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="switching to uid 65534 needs root")

# Run as uid 65534 with the kernel's address (never its key): raw connects to the iopub and shell
# endpoints, then a ZMQ subscription to iopub held while the owner runs a cell.
PROBE = r"""
import json, socket, sys, time, zmq
info, listen_s = json.loads(sys.argv[1]), float(sys.argv[2])
def addr(ch):
    if info["transport"] == "tcp":
        return "tcp://%s:%d" % (info["ip"], info[ch + "_port"])
    return "ipc://%s-%d" % (info["ip"], info[ch + "_port"])
raw = {}
for ch in ("iopub", "shell"):
    if info["transport"] == "tcp":
        s, target = socket.socket(), (info["ip"], info[ch + "_port"])
    else:
        s, target = socket.socket(socket.AF_UNIX), "%s-%d" % (info["ip"], info[ch + "_port"])
    try:
        s.connect(target)
        raw[ch] = "connected"
    except OSError as e:
        raw[ch] = type(e).__name__
    finally:
        s.close()
ctx = zmq.Context()
sub = ctx.socket(zmq.SUB)
sub.setsockopt(zmq.SUBSCRIBE, b"")
sub.connect(addr("iopub"))
print("READY", flush=True)
got, end = [], time.monotonic() + listen_s
while time.monotonic() < end:
    if sub.poll(200):
        got.append(b"".join(sub.recv_multipart()).decode("utf-8", "replace"))
print(json.dumps({"raw": raw, "received": got}), flush=True)
"""


def as_nobody(argv: list[str], **kw) -> subprocess.Popen:
    """A process of uid/gid 65534 with no supplementary groups (another local user). setpriv, not
    Popen(user=): it resolves the interpreter's path (in root's 0700 home here) before it drops root."""
    return subprocess.Popen(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *argv], cwd="/",
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def address(km_or_file) -> dict:
    """What another user could learn of a kernel: where it listens, never its key."""
    info = json.loads(Path(getattr(km_or_file, "connection_file", km_or_file)).read_text())
    return {k: info[k] for k in ("transport", "ip", "iopub_port", "shell_port")}


def eavesdrop(info: dict, action, listen_s: float = 10.0):
    """Do ``action()`` (the owner runs a cell) while uid 65534 listens on the kernel's iopub at ``info``
    (its address); returns (the probe's report, what ``action`` returned)."""
    probe = as_nobody([sys.executable, "-c", PROBE, json.dumps(info), str(listen_s)])
    try:
        assert probe.stdout.readline().strip() == "READY", probe.stderr.read()
        result = action()
        out, err = probe.communicate(timeout=listen_s + 30)
    finally:
        if probe.poll() is None:
            probe.kill()
            probe.wait()
    assert probe.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1]), result


def marker_cell(marker: str) -> str:
    """A host cell printing ``marker`` for two seconds (no Deephaven server needed: the channel is the point)."""
    return f"%%local\nimport time\nfor i in range(10):\n    print({marker!r}, i, flush=True)\n    time.sleep(0.2)"


def assert_nothing_leaked(probe: dict, marker: str) -> None:
    leaked = [m for m in probe["received"] if marker in m]
    assert not leaked and not probe["received"], f"uid {NOBODY} read the kernel's iopub: {(leaked or probe['received'])[:1]}"
    assert probe["raw"] == {"iopub": "PermissionError", "shell": "PermissionError"}, probe["raw"]


def printed(msgs: list[dict]) -> str:
    return "".join(m["content"]["text"] for m in msgs if m["msg_type"] == "stream")


@pytest.fixture
def kernel(jupyter_path, tmp_path):
    """The installed "Deephaven microVM" kernel, started as jupyter_client starts it (a runtime dir of its own)."""
    from jupyter_client.manager import start_new_kernel

    env = {**os.environ, "DHG_HOME": str(tmp_path / "dhg-home"), "DHG_BACKEND": "local"}
    km, kc = start_new_kernel(kernel_name="dhvm", env=env)
    yield km, kc
    kc.stop_channels()
    if km.has_kernel:
        km.shutdown_kernel(now=True)


def test_another_user_can_neither_reach_the_kernels_channels_nor_read_its_outputs(kernel):
    km, kc = kernel
    marker = f"secret-{secrets.token_hex(6)}"
    msgs: list[dict] = []
    probe, reply = eavesdrop(address(km), lambda: kc.execute_interactive(marker_cell(marker), timeout=120,
                                                                         output_hook=msgs.append))
    assert reply["content"]["status"] == "ok", reply["content"]
    assert f"{marker} 9" in printed(msgs), "the owner's client receives the cell's output"
    assert_nothing_leaked(probe, marker)


def test_the_kernels_sockets_live_in_a_private_dir_that_goes_with_the_kernel(kernel):
    km, kc = kernel
    info = json.loads(Path(km.connection_file).read_text())
    assert info["transport"] == "ipc", info
    sockdir = Path(info["ip"]).parent
    st = sockdir.stat()
    assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == os.geteuid(), oct(st.st_mode)
    socks = sorted(p.name for p in sockdir.iterdir())
    assert len(socks) == 5 and all(stat.S_ISSOCK((sockdir / n).stat().st_mode) for n in socks), socks
    # A restart keeps the private dir (and the same address), and the new kernel answers.
    km.restart_kernel(now=True)
    kc.wait_for_ready(timeout=60)
    reply = kc.execute_interactive("%%local\nprint('after restart')", timeout=60)
    assert reply["content"]["status"] == "ok"
    assert json.loads(Path(km.connection_file).read_text())["ip"] == info["ip"]
    assert stat.S_IMODE(sockdir.stat().st_mode) == 0o700
    kc.stop_channels()
    km.shutdown_kernel(now=False)
    assert not sockdir.exists(), f"{sockdir} outlived the kernel: {list(sockdir.iterdir())}"


@pytest.mark.slow
def test_a_kernel_jupyterlab_starts_listens_only_for_its_owner(browser, jupyter_path, tmp_path):
    """JupyterLab in Chromium: the "Deephaven microVM" kernel it starts is on private unix sockets, its
    cells run and show their output in the page, and uid 65534 given its address gets nothing."""
    pytest.importorskip("jupyterlab")
    from playwright.sync_api import expect

    from test_jupyterlab import CELL_S, Lab, Notebook

    env = {**os.environ, "JUPYTER_PATH": jupyter_path, "DHG_HOME": str(tmp_path / "dhg-home"), "DHG_BACKEND": "local"}
    lab = Lab(tmp_path, env)
    ctx = None
    try:
        lab.wait_ready()
        ctx = browser.new_context(viewport={"width": 1400, "height": 1000})
        page = ctx.new_page()
        page.set_default_timeout(60_000)
        page.goto(f"{lab.url}/lab?token={lab.token}")
        tile = page.locator('.jp-LauncherCard[data-category="Notebook"][title="Deephaven microVM"]')
        tile.click(timeout=90_000)
        expect(page.locator(".jp-Notebook .jp-Cell .cm-content").first).to_be_visible()
        expect(page.locator(".jp-NotebookPanel-toolbar")).to_contain_text("Deephaven microVM")
        # A cell run before the kernel is connected is dropped: wait for the status bar's "Idle".
        expect(page.get_by_text("Deephaven microVM | Idle")).to_be_visible(timeout=90_000)
        nb = Notebook(page, "local-security")
        cell = nb.run("%%local\nprint('hello from the lab')", timeout_s=CELL_S)
        expect(nb.outputs(cell, "application/vnd.jupyter.stdout")).to_have_text("hello from the lab\n")
        (kernel,) = lab.api("kernels")
        conn = tmp_path / "runtime" / f"kernel-{kernel['id']}.json"
        marker = f"secret-{secrets.token_hex(6)}"

        def run_in_the_page():
            c = nb.run(marker_cell(marker), timeout_s=CELL_S)
            return nb.outputs(c, "application/vnd.jupyter.stdout").inner_text()

        probe, shown = eavesdrop(address(conn), run_in_the_page)
        assert f"{marker} 9" in shown, shown
        nb.shot("security-ipc")
        assert_nothing_leaked(probe, marker)
        info = json.loads(conn.read_text())
        sockdir = Path(info["ip"]).parent
        assert info["transport"] == "ipc" and stat.S_IMODE(sockdir.stat().st_mode) == 0o700, (info, sockdir)
        lab.shutdown_kernels()
        assert not sockdir.exists(), f"{sockdir} outlived the kernel JupyterLab shut down"
    finally:
        if ctx is not None:
            ctx.close()
        try:
            lab.shutdown_kernels()
        except OSError:
            pass
        lab.stop()


# -- DHG_HOME ------------------------------------------------------------------------------------------

# Run as uid 65534: try to list, read or connect to each path given; prints what worked.
TRESPASS = r"""
import json, os, socket, stat, sys
paths, opened = json.loads(sys.argv[1]), {}
for p in paths:
    try:
        st = os.lstat(p)
        if stat.S_ISDIR(st.st_mode):
            opened[p] = "listed %d entries" % len(os.listdir(p))
        elif stat.S_ISSOCK(st.st_mode):
            s = socket.socket(socket.AF_UNIX)
            s.connect(p)
            s.close()
            opened[p] = "connected"
        else:
            with open(p, "rb") as f:
                opened[p] = "read %d bytes" % len(f.read(4096))
    except OSError as e:
        if not isinstance(e, PermissionError):
            opened[p] = "%s (not a permission refusal)" % e
print(json.dumps(opened))
"""


def trespass(paths: list[Path]) -> dict[str, str]:
    """What uid 65534 could list, read or connect to among ``paths``."""
    p = as_nobody([sys.executable, "-c", TRESPASS, json.dumps([str(x) for x in paths])])
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    return json.loads(out)


@pytest.fixture
def open_parent():
    """A directory any user may enter (like /home), for DHG_HOMEs, so a refusal is DHG_HOME's own doing."""
    d = Path(tempfile.mkdtemp(prefix="dhg-sec-"))
    os.chmod(d, 0o755)
    yield d
    import shutil

    shutil.rmtree(d, ignore_errors=True)


@pytest.mark.slow
def test_another_user_can_open_nothing_under_a_used_dhg_home(open_parent):
    from dhg_kernel.config import Layout
    from dhg_kernel.session import Session

    home = open_parent / "dhg-home"
    layout = Layout(home)
    # A home made before homes were private: 0755 like ~/.dhg was, with vm/ and run/ 0755 too.
    for d in (home, layout.vm, layout.run):
        d.mkdir(mode=0o755)
        os.chmod(d, 0o755)
    s = Session("local", home, heap="1g")
    try:
        r = s.execute("x = 6 * 7\nprint(x)")
        assert r.ok, r
        everything = [Path(root) / n for root, dirs, files in os.walk(home) for n in dirs + files]
        in_run = [p for p in everything if p.is_relative_to(layout.run)]
        assert any(p.name == "instance.json" for p in in_run) and any(p.is_socket() for p in in_run), in_run
        # The other user can enter the parent: what stops it is DHG_HOME's own mode.
        assert trespass([open_parent]) == {str(open_parent): "listed 1 entries"}
        assert trespass([home, *everything]) == {}
        for d in (home, layout.vm, layout.run, layout.cache):
            assert stat.S_IMODE(d.stat().st_mode) == 0o700, f"{d} is {oct(d.stat().st_mode)}"
        (instance,) = [p for p in layout.run.iterdir()]
        assert stat.S_IMODE(instance.stat().st_mode) == 0o700
    finally:
        s.stop()


def test_a_new_dhg_home_is_made_private(open_parent):
    from dhg_kernel.config import Layout
    from dhg_kernel.instances import destroy, new_instance

    layout = Layout(open_parent / "fresh" / "dhg-home")
    rec = new_instance(layout, "local")
    try:
        for d in (layout.home, layout.vm, layout.run, Path(rec.dir)):
            assert stat.S_IMODE(d.stat().st_mode) == 0o700, f"{d} is {oct(d.stat().st_mode)}"
        assert trespass([layout.home, layout.run, Path(rec.dir)]) == {}
    finally:
        destroy(rec)
