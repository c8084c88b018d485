"""Deephaven microVM kernels on a pool of hosts, through gateway-provisioners' DistributedProvisioner.

The hosts are network namespaces this test creates (``clusterhosts``), each with its own sshd
(key-only, host keys checked) and its own DHG_HOME holding the prepared QEMU snapshot read-only.
Kernels are started through jupyter_client with the kernelspec ``dhvm kernel install --hosts``
writes: real SSH, real kernels, real VMs on the host that runs the kernel.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import clusterhosts

pytestmark = [pytest.mark.qemu, pytest.mark.slow]
WHY_NOT = clusterhosts.why_not()
if WHY_NOT is None:
    try:
        import gateway_provisioners  # noqa: F401
    except ImportError:
        WHY_NOT = "gateway-provisioners is not installed: pip install 'dhg_kernel[cluster]'"
if WHY_NOT:
    pytestmark.append(pytest.mark.skip(reason=WHY_NOT))

CSV = "sym,px\nAAPL,1.5\nMSFT,2.5\nGOOG,3.5\n"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, qemu_home):
    """Three hosts (the third not prepared), the cluster kernelspecs, and the provisioner's side set up
    to reach them: its HOME holds the SSH key and known_hosts, its response address is on this side
    of host 1's veth pair."""
    import gateway_provisioners.distributed as gd
    import gateway_provisioners.response_manager as rm

    from dhg_kernel.cluster import install

    root = tmp_path_factory.mktemp("cluster")
    c = clusterhosts.make(root / "c", 3, qemu_home, prepared=[True, True, False])
    saved = {k: os.environ.get(k) for k in ("HOME", "KERNEL_USERNAME", "JUPYTER_PATH")}
    saved_globals = (rm.response_ip, gd.kernel_log_dir)
    try:
        os.environ["HOME"] = str(c.client_home)  # paramiko: ~/.ssh/id_ed25519 and ~/.ssh/known_hosts
        os.environ["KERNEL_USERNAME"] = "dhgtest"  # gateway-provisioners refuses kernels for 'root'
        rm.response_ip = c.hosts[0].gateway_ip
        (root / "logs").mkdir()
        gd.kernel_log_dir = str(root / "logs")
        prefix = root / "prefix"
        h1, h2, h3 = (h.ip for h in c.hosts)
        install([h1, h2], "dhvm-cluster", prefix=str(prefix))
        install([h3], "dhvm-unprepared", prefix=str(prefix))
        install([h1, h2], "dhvm-least", balance="least-connection", prefix=str(prefix))
        os.environ["JUPYTER_PATH"] = str(prefix / "share" / "jupyter")
        work = root / "work"
        work.mkdir()
        (work / "trades.csv").write_text(CSV)
        c.work = work  # type: ignore[attr-defined]
        c.logs = root / "logs"  # type: ignore[attr-defined]
        yield c
    finally:
        rm.response_ip, gd.kernel_log_dir = saved_globals
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        c.close()
        _reap_hosts(c)


def _reap_hosts(c) -> None:
    from dhg_kernel.config import Layout
    from dhg_kernel.instances import destroy, list_instances

    for h in c.hosts:
        if (h.home / "vm").is_dir():
            for rec in list_instances(Layout(h.home)):
                destroy(rec)


@pytest.fixture(autouse=True)
def fresh_balancer():
    """Each test starts the round-robin at the first host, with no host marked down."""
    from gateway_provisioners.distributed import DistributedProvisioner

    from dhg_kernel.provisioner import DhvmDistributedProvisioner

    DistributedProvisioner.host_index = 0
    DhvmDistributedProvisioner.down_until.clear()
    DistributedProvisioner.kernel_on_host._host_kernels.clear()
    DistributedProvisioner.kernel_on_host._kernel_host_mapping.clear()
    yield


class Kernel:
    """A kernel started through the cluster kernelspec, and a client on it."""

    def __init__(self, name: str, cwd: Path):
        from jupyter_client.manager import KernelManager

        self.km = KernelManager(kernel_name=name)
        self.km.start_kernel(cwd=str(cwd))
        self.kc = self.km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=120)

    @property
    def host(self) -> str:
        return self.km.provisioner.assigned_host

    @property
    def pid(self) -> int:
        return int(self.km.provisioner.pid)

    def run(self, code: str, timeout: float = 180) -> tuple[str, str, dict]:
        """(status, all the text it printed or returned, the reply content)."""
        out: list[str] = []

        def hook(msg):
            c = msg["content"]
            if msg["msg_type"] == "stream":
                out.append(c["text"])
            elif msg["msg_type"] in ("execute_result", "display_data"):
                out.append(c["data"].get("text/plain", ""))
            elif msg["msg_type"] == "error":
                out.append(f"{c['ename']}: {c['evalue']}")

        reply = self.kc.execute_interactive(code, timeout=timeout, output_hook=hook)
        return reply["content"]["status"], "".join(out), reply["content"]

    def stop(self) -> None:
        try:
            self.kc.stop_channels()
        finally:
            self.km.shutdown_kernel()


def _where(k: Kernel) -> dict:
    status, text, _ = k.run("%%local\nimport json, os\nprint(json.dumps({'cluster_host': os.environ.get('DHG_CLUSTER_HOST'), "
                            "'test_host': os.environ.get('DHG_TEST_HOST'), 'home': os.environ.get('DHG_HOME'), "
                            "'cwd': os.getcwd(), 'pid': os.getpid()}))")
    assert status == "ok", text
    return json.loads(text.strip().splitlines()[-1])


def _instances(host) -> list[str]:
    run = host.home / "vm" / "run"
    return sorted(p.name for p in run.iterdir()) if run.is_dir() else []


def _sshd_pid(h) -> int:
    return int((h.dir / "sshd.pid").read_text())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def _wait(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:.0f}s: {what}")
        time.sleep(0.2)


def test_four_kernels_land_round_robin_run_tables_and_files_interrupt_restart_and_leave_nothing(cluster):
    h1, h2, _ = cluster.hosts
    kernels: list[Kernel] = []
    try:
        t0 = time.monotonic()
        for _ in range(4):
            kernels.append(Kernel("dhvm-cluster", cluster.work))
        print(f"\n  4 kernels launched through the provisioner in {time.monotonic() - t0:.1f}s", file=sys.stderr)
        where = [_where(k) for k in kernels]
        assert [w["cluster_host"] for w in where] == [h1.ip, h2.ip, h1.ip, h2.ip]
        assert [w["test_host"] for w in where] == ["host1", "host2", "host1", "host2"]  # sshd's own env: really there
        assert all(w["cwd"] == str(cluster.work) for w in where)  # started in the notebook's directory
        status, text, _ = kernels[1].run("%dhvm status")
        assert status == "ok" and f"cluster_host: {h2.ip} (this kernel and its VMs run there)" in text, text
        assert f"ssh -N -L" in text and f" {h2.ip} (then open web_ide)" in text  # the web IDE is on h2's loopback
        for k in kernels:  # the ZMQ traffic between hosts is CurveZMQ-encrypted by default
            log = (cluster.logs / f"kernel-{k.km.kernel_id}.log").read_text()
            assert '"curve_publickey"' in log and "without encryption" not in log
        for k, w in zip(kernels, where):
            assert w["home"] == str((h1 if w["test_host"] == "host1" else h2).home)
            status, text, _ = k.run("from deephaven import read_csv\nt = read_csv('trades.csv')\nprint('rows', t.size)")
            assert status == "ok" and "rows 3" in text, text  # the file was pushed from the host's directory
        # Each host runs the VMs of its own kernels, and only those.
        assert len(_instances(h1)) == 2 and len(_instances(h2)) == 2

        # Interrupt: a long cell in the VM of kernel 0 stops, and the kernel keeps its state.
        k = kernels[0]
        msg_id = k.kc.execute("import time\ntime.sleep(120)")
        time.sleep(3)
        t1 = time.monotonic()
        k.km.interrupt_kernel()
        reply = k.kc.get_shell_msg(timeout=60)
        assert reply["parent_header"]["msg_id"] == msg_id
        assert reply["content"]["status"] == "error" and reply["content"]["ename"] == "KeyboardInterrupt"
        print(f"  interrupt answered in {time.monotonic() - t1:.2f}s", file=sys.stderr)
        status, text, _ = k.run("print('still', t.size)")
        assert status == "ok" and "still 3" in text, text

        # Restart: a fresh kernel (on whichever host comes next), no VM of the old one left behind.
        k = kernels[1]
        old_pid, old_host = k.pid, k.host
        k.km.restart_kernel()
        # A restarted remote kernel has new ports (maybe on another host): a client connects anew, as Jupyter
        # Server's channels do after a restart.
        k.kc.stop_channels()
        k.kc = k.km.client()
        k.kc.start_channels()
        k.kc.wait_for_ready(timeout=120)
        _wait(lambda: not _alive(old_pid), 20, "the restarted kernel's old process ended")
        status, text, _ = k.run("print('after restart', 6 * 7)")
        assert status == "ok" and "after restart 42" in text, text
        status, text, _ = k.run("t")
        assert status == "error" and "NameError" in text  # a restart is a fresh server
        print(f"  restart: {old_host} -> {k.host}", file=sys.stderr)

        # Kernel death: kill -9 on its host; jupyter_client sees it (asking the host over SSH), its VM goes.
        k = kernels[2]
        pid = k.pid
        os.kill(pid, signal.SIGKILL)
        _wait(lambda: not k.km.is_alive(), 30, "jupyter_client noticed the dead kernel")
    finally:
        pids = [k.pid for k in kernels]
        kids = [k.km.kernel_id for k in kernels]
        for k in kernels:
            k.stop()
    _wait(lambda: not any(_alive(p) for p in pids), 20, "every kernel process ended")
    _wait(lambda: not _instances(h1) and not _instances(h2), 30, "no VM or run dir left on any host")
    left = subprocess.run(["pgrep", "-f", f"{cluster.hosts[0].home}|{cluster.hosts[1].home}"], capture_output=True,
                          text=True).stdout.split()
    assert not [p for p in left if int(p) != os.getpid()], f"processes of the hosts left: {left}"
    # The connection files the launcher wrote on the hosts, also the killed kernel's.
    assert not [f for kid in kids for f in Path("/tmp").glob(f"kernel-{kid}_*.json")]

    def only_sshd(h) -> bool:  # no SSH session left on a host (a kernel must not hold its channel)
        pids = subprocess.run(["ip", "netns", "pids", h.netns], capture_output=True, text=True).stdout.split()
        return pids == [str(h.proc.pid)] or [int(p) for p in pids] == [_sshd_pid(h)]
    _wait(lambda: only_sshd(h1) and only_sshd(h2), 15, "only each host's sshd runs in it")


def test_least_connection_spreads_kernels_and_counts_them_back_down(cluster):
    h1, h2, _ = cluster.hosts
    a = Kernel("dhvm-least", cluster.work)
    b = Kernel("dhvm-least", cluster.work)
    try:
        assert {a.host, b.host} == {h1.ip, h2.ip}
    finally:
        a.stop()
    c = Kernel("dhvm-least", cluster.work)
    try:
        assert c.host == a.host  # the host that has no kernel now
    finally:
        b.stop()
        c.stop()


def test_a_missing_notebook_directory_on_the_host_is_refused_naming_host_and_path(cluster):
    from jupyter_client.manager import KernelManager

    km = KernelManager(kernel_name="dhvm-cluster")
    with pytest.raises(RuntimeError) as e:
        km.start_kernel(cwd="/no/such/notebooks/dir")
    msg = str(e.value)
    assert cluster.hosts[0].ip in msg and "/no/such/notebooks/dir" in msg, msg
    assert "every host mounts at the same path" in msg


def test_an_unprepared_host_is_refused_with_its_name_and_the_fix(cluster):
    from jupyter_client.manager import KernelManager

    km = KernelManager(kernel_name="dhvm-unprepared")
    with pytest.raises(RuntimeError) as e:
        km.start_kernel(cwd=str(cluster.work))
    msg = str(e.value)
    assert cluster.hosts[2].ip in msg and "dhvm prepare" in msg and "no VM backend is ready" in msg, msg
    assert not _instances(cluster.hosts[2])


def test_a_host_that_is_down_is_named_and_the_next_launch_goes_elsewhere(cluster):
    from gateway_provisioners.distributed import DistributedProvisioner
    from jupyter_client.manager import KernelManager

    h1, h2, _ = cluster.hosts
    h2.stop_sshd()
    try:
        DistributedProvisioner.host_index = 1  # the next launch is h2's turn
        km = KernelManager(kernel_name="dhvm-cluster")
        with pytest.raises(RuntimeError) as e:
            km.start_kernel(cwd=str(cluster.work))
        msg = str(e.value)
        assert f"host {h2.ip} could not be reached over SSH" in msg and f"ssh {h2.ip} true" in msg, msg
        DistributedProvisioner.host_index = 1  # h2's turn again: it is skipped
        k = Kernel("dhvm-cluster", cluster.work)
        try:
            assert k.host == h1.ip
        finally:
            k.stop()
    finally:
        h2.start_sshd()


def test_dhvm_status_host_says_ready_not_prepared_or_unreachable(cluster):
    h1, _, h3 = cluster.hosts
    env = {**os.environ}

    def status(host: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "dhg_kernel", "status", "--host", host], env=env,
                              capture_output=True, text=True, timeout=120)

    p = status(h1.ip)
    assert p.returncode == 0 and f"{h1.ip}: ready: cells would run on the qemu backend" in p.stdout, p.stdout + p.stderr
    p = status(h3.ip)
    assert p.returncode == 1 and "NOT ready" in p.stdout and "dhvm prepare" in p.stdout, p.stdout
    h2 = cluster.hosts[1]
    h2.stop_sshd()  # the host is there, its sshd is not
    try:
        p = status(h2.ip)
    finally:
        h2.start_sshd()
    assert p.returncode == 2 and f"{h2.ip}: not reachable over SSH" in p.stdout and f"ssh {h2.ip} true" in p.stdout, p.stdout


def test_curve_is_the_default_and_the_kernelspec_can_turn_it_off():
    from traitlets.config import Config

    from dhg_kernel.provisioner import DhvmDistributedProvisioner

    p = DhvmDistributedProvisioner()
    p._resolve_transport_encryption("disabled")  # an explicit launch argument wins
    assert p.transport_encryption == "disabled" and not p.curve_enabled
    cfg = Config({"DhvmDistributedProvisioner": {"default_transport_encryption": "disabled"}})
    p = DhvmDistributedProvisioner(config=cfg)
    p._resolve_transport_encryption(None)
    assert p.transport_encryption == "disabled"
    assert DhvmDistributedProvisioner().default_transport_encryption == "auto"
