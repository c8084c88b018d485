"""`dhvm exec`, and that instances are cleaned up: on stop, on SIGTERM, and after a kill -9."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from dhg_kernel.config import Layout
from dhg_kernel.instances import alive, list_instances, reap_stale

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def dhvm(*args, cwd, home, check=True):
    env = {**os.environ, "DHG_HOME": str(home)}
    p = subprocess.run([sys.executable, "-m", "dhg_kernel.cli", *args], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=300)
    if check and p.returncode not in (0, 1):
        raise AssertionError(f"dhvm {args} exited {p.returncode}: {p.stderr}")
    return p


def test_exec_json_reports_output_tables_and_pushed_files(workspace, tmp_path):
    home = tmp_path / "home"
    code = 'from deephaven import read_csv\nt = read_csv("data/trades.csv")\nprint("n", t.size)'
    p = dhvm("exec", "--json", "-c", code, cwd=workspace, home=home)
    out = json.loads(p.stdout)
    assert p.returncode == 0 and out["ok"] and out["stdout"] == "n 3\n"
    assert out["files"] == ["data/trades.csv"]
    t = out["tables"][0]
    assert t["name"] == "t" and t["rows"] == 3 and t["data"][0] == {"sym": "AAPL", "px": 1.5, "qty": 10}
    assert out["timings"]["exec_ms"] > 0
    assert list_instances(Layout(home)) == [], "the instance is gone after exec"


def test_exec_script_file_prints_tables_and_fails_on_error(workspace, tmp_path):
    home = tmp_path / "home"
    (workspace / "job.py").write_text("from deephaven import empty_table\nsquares = empty_table(3).update('S = i * i')\n")
    p = dhvm("exec", "job.py", cwd=workspace, home=home)
    assert p.returncode == 0 and "squares" in p.stdout and "4" in p.stdout
    p = dhvm("exec", "-c", "raise RuntimeError('nope')", cwd=workspace, home=home)
    assert p.returncode == 1 and "RuntimeError: nope" in p.stderr


def test_exec_refuses_files_over_the_limit(workspace, tmp_path):
    (workspace / "big.csv").write_bytes(b"x" * 300_000)
    p = dhvm("exec", "--max-push-mb", "0.1", "-c", 'open("big.csv")', cwd=workspace, home=tmp_path / "h", check=False)
    assert p.returncode == 2 and "push limit" in p.stderr


OWNER = textwrap.dedent("""
    import sys, time
    from dhg_kernel.session import Session
    s = Session("local", sys.argv[1], heap="512m")
    s.start()
    print(s.instance.dir, s.instance.record.processes[0].pid, flush=True)
    time.sleep(600)
""")


def _start_owner(home: Path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.Popen([sys.executable, "-c", OWNER, str(home)], stdout=subprocess.PIPE, text=True, env=env)
    line = p.stdout.readline().split()
    assert line, "the owner process did not start its agent"
    return p, Path(line[0]), int(line[1])


def _wait_gone(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not alive(pid, None):
            return True
        time.sleep(0.1)
    return False


def test_kill_9_of_the_owner_leaves_nothing_within_seconds(tmp_path):
    home = tmp_path / "home"
    owner, inst_dir, agent_pid = _start_owner(home)
    assert inst_dir.is_dir() and alive(agent_pid, None)
    # The JVM runs in the agent's process; its attach socket (always in /tmp) would outlive a kill -9.
    attach = Path(f"/tmp/.java_pid{agent_pid}")
    assert not attach.exists(), "the JVM opened an attach socket in /tmp"
    owner.kill()
    owner.wait()
    assert _wait_gone(agent_pid, 10), "the agent outlived its owner"
    deadline = time.monotonic() + 10
    while inst_dir.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not inst_dir.exists(), "the owner's watchdog removes the instance"
    assert not attach.exists()
    assert reap_stale(Layout(home)) == []


def test_sigterm_of_the_owner_destroys_its_instance(tmp_path):
    home = tmp_path / "home"
    owner, inst_dir, agent_pid = _start_owner(home)
    owner.send_signal(signal.SIGTERM)
    owner.wait(timeout=20)
    assert _wait_gone(agent_pid, 10)
    assert not inst_dir.exists()


def test_a_dead_agent_is_an_error_in_the_cell_and_the_next_cell_gets_a_new_one(dhg_home):
    from dhg_kernel.session import Session

    s = Session("local", dhg_home, heap="512m")
    try:
        s.execute("x = 1")
        first = s.instance.id
        r = s.execute("import os\nos._exit(3)")
        assert r.error.name == "AgentDied" and "next cell starts a fresh server" in r.error.value
        r = s.execute("print('back')")
        assert r.ok and r.stdout == "back\n" and s.instance.id != first
    finally:
        s.stop()


def test_kernel_shutdown_destroys_the_magics_instance(tmp_path):
    from jupyter_client.manager import start_new_kernel

    home = tmp_path / "home"
    km, kc = start_new_kernel(kernel_name="python3", env={**os.environ, "DHG_HOME": str(home)})
    try:
        kc.execute_interactive("%load_ext dhg_kernel", timeout=60)
        reply = kc.execute_interactive("%%dhvm\nx = 1", timeout=300)
        assert reply["content"]["status"] == "ok"
        (record,) = list_instances(Layout(home))
        agent_pid = record.processes[0].pid
        assert alive(agent_pid, None)
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=False)
    assert _wait_gone(agent_pid, 10)
    assert list_instances(Layout(home)) == [] and not Path(record.dir).exists()


def test_a_cell_that_ignores_the_cancel_gets_its_instance_replaced(dhg_home):
    from dhg_kernel.session import Session

    s = Session("local", dhg_home, heap="512m")
    try:
        s.execute("state = 1")
        first = s.instance
        t0 = time.monotonic()
        r = s.execute("import signal, time\nsignal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})\ntime.sleep(60)",
                      timeout=0.5)
        assert time.monotonic() - t0 < 20
        assert r.status == "cancelled" and "replaced" in r.error.value and "state" in r.error.value
        assert not first.alive() and not first.dir.exists()
        r = s.execute("print('state' in globals())")
        assert r.stdout.strip() == "False" and s.instance is not first
    finally:
        s.stop()


def test_interrupting_a_dhvm_cell_in_a_plain_ipython_kernel(tmp_path):
    import threading

    from jupyter_client.manager import start_new_kernel

    km, kc = start_new_kernel(kernel_name="python3", env={**os.environ, "DHG_HOME": str(tmp_path)})
    try:
        kc.execute_interactive("%load_ext dhg_kernel", timeout=60)
        kc.execute_interactive("%%dhvm\nkept = 'yes'", timeout=300)
        threading.Timer(1.0, km.interrupt_kernel).start()
        t0 = time.monotonic()
        reply = kc.execute_interactive("%%dhvm\nimport time\ntime.sleep(60)", timeout=120)["content"]
        assert reply["status"] == "error" and reply["ename"] == "KeyboardInterrupt"
        assert time.monotonic() - t0 < 20
        out = []
        kc.execute_interactive("%%dhvm\nprint(kept)", timeout=60,
                               output_hook=lambda m: out.append(m["content"].get("text", "")))
        assert "yes" in "".join(out)
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=False)


def test_the_local_agents_temp_files_live_in_its_instance_dir(tmp_path):
    from dhg_kernel.session import Session

    s = Session("local", tmp_path, heap="512m")
    try:
        info = s.start()
        inst_dir = s.instance.dir
        assert Path(info["tmpdir"]).parent == inst_dir
        port = info["server"]["port"]
        assert list(Path(info["tmpdir"]).glob(f"jetty-*{port}*")), "Jetty's work dir is in the instance's tmp"
        import tempfile

        assert not list(Path(tempfile.gettempdir()).glob(f"jetty-*-{port}-*")), "nothing in the shared /tmp"
    finally:
        s.stop()
    assert not inst_dir.exists()


def test_prepare_refuses_a_jailer_user_without_a_jailer_or_one_that_does_not_exist(tmp_path):
    home = tmp_path / "home"
    p = dhvm("prepare", "--backend", "firecracker", "--jailer-user", "nobody", cwd=tmp_path, home=home, check=False)
    assert p.returncode == 2 and "--jailer-user needs --jailer" in p.stderr
    p = dhvm("prepare", "--backend", "firecracker", "--jailer", "/x/jailer", "--jailer-user", "no-such-user-dhg",
             cwd=tmp_path, home=home, check=False)
    assert p.returncode == 2 and "no-such-user-dhg" in p.stderr and "UID[:GID]" in p.stderr
    assert not (home / "vm").exists()  # refused before anything was built


def test_kernel_install_hosts_and_kubernetes_through_the_cli(tmp_path):
    prefix = tmp_path / "prefix"
    p = dhvm("kernel", "install", "--hosts", "h1,h2", "--balance", "least-connection", "--prefix", str(prefix),
             cwd=tmp_path, home=tmp_path / "home")
    assert p.returncode == 0 and "dhvm status --host h1" in p.stdout, p.stderr
    spec = json.loads((prefix / "share/jupyter/kernels/dhvm-cluster/kernel.json").read_text())
    prov = spec["metadata"]["kernel_provisioner"]
    assert prov["provisioner_name"] == "dhvm-distributed-provisioner"
    assert prov["config"]["remote_hosts"] == ["h1", "h2"] and prov["config"]["load_balancing_algorithm"] == "least-connection"
    p = dhvm("kernel", "install", "--hosts", "h1,,h2", "--prefix", str(prefix), cwd=tmp_path, home=tmp_path / "home",
             check=False)
    assert p.returncode == 2 and "--hosts wants host names separated by commas" in p.stderr
    p = dhvm("kernel", "install", "--kubernetes", "reg.example/dhvm:1", "--prefix", str(prefix), cwd=tmp_path,
             home=tmp_path / "home")
    assert p.returncode == 0 and "/dev/kvm by device-plugin" in p.stdout, p.stderr
    env = {"JUPYTER_PATH": str(prefix / "share" / "jupyter")}
    r = subprocess.run([sys.executable, "-m", "dhg_kernel.cli", "kernel", "uninstall", "--name", "dhvm-cluster"],
                       env={**os.environ, **env}, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and not (prefix / "share/jupyter/kernels/dhvm-cluster").exists(), r.stderr
