"""The "Deephaven microVM" kernel, driven as Jupyter drives it (jupyter_client), and batch runs."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from dhg_kernel.config import Layout
from dhg_kernel.instances import alive, list_instances

pytestmark = pytest.mark.slow
NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"


@pytest.fixture(scope="module")
def kernel(jupyter_path, dhg_home):
    from jupyter_client.manager import start_new_kernel

    km, kc = start_new_kernel(kernel_name="dhvm", env={**os.environ, "DHG_HOME": str(dhg_home)})
    yield km, kc
    kc.stop_channels()
    km.shutdown_kernel(now=False)


def run(kc, code, timeout=300):
    msgs = []
    reply = kc.execute_interactive(code, timeout=timeout, output_hook=msgs.append)
    return reply["content"], [m for m in msgs if m["msg_type"] not in ("status", "execute_input")]


def streams(msgs):
    return "".join(m["content"]["text"] for m in msgs if m["msg_type"] == "stream")


def test_kernelspec_is_listed_with_its_display_name(jupyter_path):
    from jupyter_client.kernelspec import KernelSpecManager

    spec = KernelSpecManager().get_kernel_spec("dhvm")
    assert spec.display_name == "Deephaven microVM" and spec.language == "python"
    assert spec.interrupt_mode == "signal" and Path(spec.argv[0]).exists()
    assert (Path(spec.resource_dir) / "logo-64x64.png").exists()


def test_ordinary_cells_run_in_the_vm_and_local_cells_on_the_host(kernel):
    km, kc = kernel
    _, vm = run(kc, "import os\nprint(os.getpid())")
    _, host = run(kc, "%%local\nimport os\nprint(os.getpid())")
    assert int(streams(host)) == km.provisioner.process.pid, "%%local runs in the kernel process"
    assert int(streams(vm)) != km.provisioner.process.pid, "ordinary cells do not"


def test_stream_then_tables_then_the_last_value(kernel):
    _, kc = kernel
    reply, msgs = run(kc, "from deephaven import empty_table\nprint('before')\n"
                          "kt = empty_table(3).update(['X = i'])\nprint('after')\n6 * 7")
    assert reply["status"] == "ok"
    kinds = [m["msg_type"] for m in msgs]
    assert kinds[0] == "stream" and kinds[-1] == "execute_result"
    assert "before\nafter\n" == streams(msgs)
    assert "kt" in msgs[kinds.index("display_data")]["content"]["data"]["text/plain"]
    assert msgs[-1]["content"]["data"]["text/plain"] == "42"


def test_errors_reply_with_the_remote_traceback(kernel):
    _, kc = kernel
    reply, _ = run(kc, "def f():\n    raise KeyError('missing')\nf()")
    assert reply["status"] == "error" and reply["ename"] == "KeyError"
    assert any("raise KeyError('missing')" in line for line in reply["traceback"])


def test_line_magics_run_on_the_host(kernel):
    _, kc = kernel
    _, msgs = run(kc, "%dhvm status")
    assert "backend: local" in streams(msgs)
    reply, _ = run(kc, "%config Dhvm.max_rows = 2")
    assert reply["status"] == "ok"
    _, msgs = run(kc, "from deephaven import empty_table\ncut = empty_table(10)")
    assert "first 2 of 10 rows" in msgs[0]["content"]["data"]["text/plain"]
    run(kc, "%config Dhvm.max_rows = 1000")


def test_interrupt_cancels_the_vm_work_and_the_session_survives(kernel):
    km, kc = kernel
    run(kc, "survivor = 'still here'")
    t0 = time.monotonic()
    threading.Timer(1.0, km.interrupt_kernel).start()
    reply, _ = run(kc, "import time\ntime.sleep(60)")
    elapsed = time.monotonic() - t0
    print(f"interrupt answered {elapsed - 1.0:.2f}s after it was sent")
    assert reply["status"] == "error" and reply["ename"] == "KeyboardInterrupt"
    assert elapsed < 20, "the sleep was not cancelled"
    _, msgs = run(kc, "print(survivor)")
    assert streams(msgs).strip() == "still here"


def test_completion_of_vm_names_methods_and_columns(kernel):
    _, kc = kernel
    run(kc, "from deephaven import empty_table\nquotes_tbl = empty_table(2).update(['Symbol = `A`', 'Bid = 1.0'])")
    r = kc.complete("quotes_t", 8, reply=True)["content"]
    assert "quotes_tbl" in r["matches"] and r["cursor_start"] == 0
    r = kc.complete("quotes_tbl.upd", 14, reply=True)["content"]
    assert "update" in r["matches"]
    code = 'quotes_tbl.where("Sym'
    r = kc.complete(code, len(code), reply=True)["content"]
    assert r["matches"] == ["Symbol"] and r["cursor_start"] == len(code) - 3


def test_completion_in_dhvm_cells_asks_the_session_the_cell_names(kernel):
    """In a %%dhvm cell (here in the microVM kernel) the body completes from the cell's own session:
    -s NAME's, or main's; the first line is IPython's."""
    _, kc = kernel
    run(kc, "only_in_main = 1")
    reply, _ = run(kc, "%%dhvm -s side\nonly_in_side = 2")
    assert reply["status"] == "ok"
    code = "%%dhvm -s side\nonly_in_s"
    r = kc.complete(code, len(code), reply=True)["content"]
    assert r["matches"] == ["only_in_side"] and r["cursor_start"] == len("%%dhvm -s side\n")
    code = "%%dhvm\nonly_in_m"
    r = kc.complete(code, len(code), reply=True)["content"]
    assert r["matches"] == ["only_in_main"] and r["cursor_start"] == len("%%dhvm\n")
    code = "%%dhvm -s nosuch\nonly_in"
    assert kc.complete(code, len(code), reply=True)["content"]["matches"] == [], "a session was made by a Tab"
    run(kc, "%dhvm -s side stop")


def test_inspection_of_a_vm_table(kernel):
    _, kc = kernel
    run(kc, "from deephaven import empty_table\ninspected = empty_table(5).update(['Price = 1.5'])")
    r = kc.inspect("inspected", 9, reply=True)["content"]
    text = r["data"]["text/plain"]
    assert r["found"] and "5 rows" in text and "Price" in text and "double" in text
    assert not kc.inspect("no_such_name_here", 5, reply=True)["content"]["found"]


def test_restart_gives_a_fresh_vm_and_shutdown_leaves_nothing(jupyter_path, tmp_path):
    from jupyter_client.manager import start_new_kernel

    home = tmp_path / "home"
    km, kc = start_new_kernel(kernel_name="dhvm", env={**os.environ, "DHG_HOME": str(home)})
    try:
        run(kc, "remember_me = 1")
        (first,) = list_instances(Layout(home))
        km.restart_kernel(now=False)
        kc.wait_for_ready(timeout=60)
        reply, _ = run(kc, "print(remember_me)")
        assert reply["status"] == "error" and reply["ename"] == "NameError"
        assert not alive(first.processes[0].pid, None) and not Path(first.dir).exists()
        (second,) = list_instances(Layout(home))
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=False)
    time.sleep(0.5)
    assert not alive(second.processes[0].pid, None)
    assert list_instances(Layout(home)) == []


def test_a_kernel_without_a_backend_starts_and_each_cell_says_why(jupyter_path, tmp_path):
    from jupyter_client.manager import start_new_kernel

    env = {**os.environ, "DHG_HOME": str(tmp_path), "DHG_BACKEND": "no-such-backend"}
    km, kc = start_new_kernel(kernel_name="dhvm", env=env)
    try:
        reply, msgs = run(kc, "x = 1", timeout=60)
        assert reply["status"] == "error"
        assert "unknown backend 'no-such-backend'" in "\n".join(reply["traceback"])
        reply, _ = run(kc, "%%local\nprint('host still works')", timeout=60)
        assert reply["status"] == "ok"
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def test_papermill_parameters_reach_the_vm(jupyter_path, tmp_path, dhg_home):
    import nbformat
    import shutil

    work = tmp_path / "nb"
    shutil.copytree(NOTEBOOKS, work)
    out = tmp_path / "pm.ipynb"
    p = subprocess.run([sys.executable, "-m", "papermill", str(work / "kernel.ipynb"), str(out), "-k", "dhvm",
                        "-p", "min_size", "500", "--cwd", str(work)],
                       capture_output=True, text=True, env={**os.environ, "DHG_HOME": str(dhg_home)}, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    nb = nbformat.read(out, 4)
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "min_size in the VM: 500" in text


def test_kernel_install_and_uninstall_through_the_cli(tmp_path):
    env = {**os.environ, "JUPYTER_PATH": str(tmp_path / "share" / "jupyter")}
    p = subprocess.run([sys.executable, "-m", "dhg_kernel.cli", "kernel", "install", "--prefix", str(tmp_path)],
                       capture_output=True, text=True, env=env)
    assert p.returncode == 0, p.stderr
    listed = subprocess.run([sys.executable, "-m", "jupyter", "kernelspec", "list"], capture_output=True,
                            text=True, env=env).stdout
    assert "dhvm" in listed and str(tmp_path) in listed
    p = subprocess.run([sys.executable, "-m", "dhg_kernel", "kernel", "uninstall"], capture_output=True, text=True, env=env)
    assert p.returncode == 0 and "removed" in p.stdout
    # Again: nothing to remove is a clear error (exit 2), not a traceback.
    p = subprocess.run([sys.executable, "-m", "dhg_kernel", "kernel", "uninstall"], capture_output=True, text=True, env=env)
    assert p.returncode == 2 and "no 'dhvm' kernelspec" in p.stderr and "Traceback" not in p.stderr, p.stderr
    listed = subprocess.run([sys.executable, "-m", "jupyter", "kernelspec", "list"], capture_output=True,
                            text=True, env=env).stdout
    assert str(tmp_path) not in listed
