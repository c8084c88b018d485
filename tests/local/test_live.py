"""Live views of ticking tables: the agent's watch stream, the session's feeds, and what a notebook
receives (update_display_data of one display id) in both kernels, until the view is stopped.

Deephaven's update graph ticks once a second by default, so a ticking table grows in steps of a
second; the tests wait for a few of them.
"""

from __future__ import annotations

import json
import os
import queue
import re
import threading
import time
from pathlib import Path

import nbformat
import pytest

pytestmark = pytest.mark.slow


def _collect(session, name, **kw):
    got: "queue.Queue" = queue.Queue()
    ended: "queue.Queue" = queue.Queue()
    feed = session.watch(name, got.put, ended.put, **kw)
    return feed, got, ended


def _drain(q: "queue.Queue", seconds: float) -> list:
    """What ``q`` (a queue, or anything with ``get(timeout=)``) yields within ``seconds``."""
    out, deadline = [], time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        try:
            out.append(q.get(timeout=left))
        except queue.Empty:
            break
    return out


def _live_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("dhvm-live")]


def test_a_ticking_table_streams_growing_snapshots_of_its_last_rows_until_stopped(session):
    r = session.execute("from deephaven import time_table\nlv = time_table('PT0.1S').update('X = i')")
    assert r.ok, r.error
    assert r.table("lv").watch == "lv"
    feed, got, ended = _collect(session, "lv", rows=5)
    updates = _drain(got, 4.5)
    assert len(updates) >= 3, updates
    counts = [u.table.rows for u in updates]
    assert counts == sorted(counts) and counts[-1] > counts[0], counts
    last = updates[-1]
    assert last.ticking and not last.head and last.updated is not None
    assert last.table.arrow.num_rows == 5
    # the last rows: X counts up to the row count
    assert list(last.table.df["X"]) == list(range(last.table.rows - 5, last.table.rows))
    assert session.stats()["live_views"] == 1 and _live_threads() == ["dhvm-live-lv"]
    feed.stop("stopped by the test")
    assert ended.get(timeout=3) == "stopped by the test"
    while not got.empty():  # updates that arrived before the view ended (after the drain above)
        got.get_nowait()
    assert not feed.running and _live_threads() == []
    assert session.stats()["live_views"] == 0
    assert _drain(got, 2.0) == []  # nothing after the end


def test_the_rate_limit_coalesces_ticks_and_head_shows_the_first_rows(session):
    r = session.execute("from deephaven import time_table\nfast = time_table('PT0.01S').update('X = i')")
    assert r.ok, r.error
    feed, got, ended = _collect(session, "fast", rows=3, head=True, rate=0.5)
    updates = _drain(got, 5.0)
    feed.stop()
    ended.get(timeout=3)
    # at most one snapshot per 2 s (plus the first at once), though the table ticked every cycle
    assert 2 <= len(updates) <= 4, [u.seq for u in updates]
    assert all(list(u.table.df["X"]) == [0, 1, 2] for u in updates[1:])
    done_ticks = feed.last.table.rows
    assert done_ticks > 100  # hundreds of rows arrived meanwhile, in few snapshots


def test_a_view_ends_when_its_name_is_rebound_or_deleted_and_a_static_table_sends_one_snapshot(session):
    session.execute("from deephaven import time_table, empty_table\nrb = time_table('PT0.1S')\n"
                    "gone = time_table('PT0.1S')\nstill = empty_table(3).update('X = i')")
    f1, _, end1 = _collect(session, "rb")
    f2, _, end2 = _collect(session, "gone")
    f3, got3, end3 = _collect(session, "still")
    time.sleep(1.0)
    session.execute("rb = 1\ndel gone")
    assert end1.get(timeout=3) == "rebound"
    assert end2.get(timeout=3) == "released"
    assert end3.get(timeout=3) == "static"
    assert [u.table.rows for u in _drain(got3, 0.5)] == [3]
    assert _live_threads() == []


def test_an_unnamed_ticking_result_is_kept_for_its_view_and_released_after(session):
    r = session.execute("from deephaven import time_table\ntime_table('PT0.1S')")
    t = r.tables[-1]
    assert t.refreshing and t.watch and t.watch.startswith("_dhvm_live_"), t
    feed, got, ended = _collect(session, t.watch)
    assert _drain(got, 2.5)
    feed.stop()
    ended.get(timeout=3)
    r = session.execute(f"print({t.watch!r} in globals())")
    assert r.stdout.strip() == "False"


def test_bad_watches_are_clear_errors(session):
    from dhg_kernel.errors import UsageError

    feed, got, ended = _collect(session, "no_such_table")
    why = ended.get(timeout=5)
    assert why.startswith("error:") and "no Deephaven table named 'no_such_table'" in why
    with pytest.raises(UsageError, match="rate"):
        session.watch("x", print, rate=0)


def test_stopping_the_session_ends_every_view(dhg_home):
    from dhg_kernel.session import Session

    s = Session("local", dhg_home, heap="1g")
    try:
        s.execute("from deephaven import time_table\na = time_table('PT0.1S')\nb = time_table('PT0.1S')")
        ends: "queue.Queue" = queue.Queue()
        s.watch("a", lambda u: None, ends.put)
        s.watch("b", lambda u: None, ends.put)
        time.sleep(1.0)
        assert len(s.live_views()) == 2
        s.reset()
        assert sorted([ends.get(timeout=3), ends.get(timeout=3)]) == ["the session was reset"] * 2
        assert s.live_views() == [] and _live_threads() == []
    finally:
        s.stop()


# -- in a kernel: what the notebook receives ------------------------------------------------------------

def _rows_of(msg) -> int:
    m = re.search(r"data-rows='(\d+)'", msg["content"]["data"].get("text/html", ""))
    assert m, msg["content"]["data"]
    return int(m.group(1))


class _IOPub:
    def __init__(self, kc):
        self.get = kc.get_iopub_msg


def _iopub_until(kc, seconds: float) -> list:
    """The kernel's iopub messages within ``seconds``."""
    return _drain(_IOPub(kc), seconds)


def _host(kc, code: str) -> str:
    """Run ``code`` on the kernel's host side (``%%local`` works in both kernels: a plain IPython kernel
    runs it as ``%%local`` would not exist, so it is stripped there)."""
    outs: list = []
    reply = kc.execute_interactive(code, timeout=60, output_hook=outs.append)
    assert reply["content"]["status"] == "ok", reply["content"]
    return "".join(m["content"].get("text", "") for m in outs if m["msg_type"] == "stream")


@pytest.mark.parametrize("kernel_name, stop", [("dhvm", "live stop"), ("python3", "live stop"), ("python3", "reset")])
def test_a_kernel_updates_the_live_view_in_place_and_stops_it_cleanly(kernel_name, stop, jupyter_path, dhg_home):
    """``%dhvm live stop`` leaves the kernel as it was with the server running; ``%dhvm reset`` as it was
    before the server started."""
    from jupyter_client.manager import start_new_kernel

    km, kc = start_new_kernel(kernel_name=kernel_name,
                              env={**os.environ, "DHG_HOME": str(dhg_home), "DHG_BACKEND": "local"})
    local = "%%local\n" if kernel_name == "dhvm" else ""
    prefix = "" if kernel_name == "dhvm" else "%%dhvm\n"
    try:
        if kernel_name == "python3":
            _host(kc, "%load_ext dhg_kernel\n%config Dhvm.heap = '1g'")
        # sockets, pipes and live-view threads (an eventfd the kernel's own machinery may open lazily is not ours)
        census = (local + "import json, os, threading\n"
                  "def _target(f):\n    try:\n        return os.readlink(f'/proc/self/fd/{f}')\n"
                  "    except OSError:\n        return ''\n"
                  "fds = sorted(map(_target, os.listdir('/proc/self/fd')))\n"
                  "print(json.dumps({'threads': sorted(t.name for t in threading.enumerate() "
                  "if t.name.startswith('dhvm-live')), 'sockets': [f for f in fds if f.startswith('socket:')], "
                  "'pipes': [f for f in fds if f.startswith('pipe:')]}))")
        if stop == "reset":
            before = json.loads(_host(kc, census))  # no server yet (a plain kernel starts one at its first %%dhvm cell)
        _host(kc, prefix + "x = 1")
        if stop != "reset":
            before = json.loads(_host(kc, census))  # the server is up before counting
        msgs: list = []
        reply = kc.execute_interactive(prefix + "from deephaven import time_table\n"
                                       "ticks = time_table('PT0.2S').update('X = i')",
                                       timeout=300, output_hook=msgs.append)
        assert reply["content"]["status"] == "ok"
        views = [m for m in msgs if m["msg_type"] == "display_data"
                 and "dhvm-live" in m["content"]["data"].get("text/html", "")]
        assert len(views) == 1, [m["msg_type"] for m in msgs]
        display_id = views[0]["content"]["transient"]["display_id"]
        # between cells, the view goes on updating the same output
        later = [m for m in _iopub_until(kc, 4.0) if m["msg_type"] == "update_display_data"]
        assert len(later) >= 3 and {m["content"]["transient"]["display_id"] for m in later} == {display_id}
        rows = [_rows_of(m) for m in later]
        assert rows == sorted(rows) and rows[-1] > rows[0], rows
        assert re.search(r"snapshot at \d\d:\d\d:\d\d UTC \(live while the kernel runs; re-run the cell to resume\)",
                         later[-1]["content"]["data"]["text/plain"]), later[-1]["content"]["data"]["text/plain"]
        assert json.loads(_host(kc, census))["threads"] == ["dhvm-live-ticks"]

        msgs = []
        kc.execute_interactive(f"%dhvm {stop}", timeout=60, output_hook=msgs.append)
        final = [m for m in msgs if m["msg_type"] == "update_display_data"]
        why = "stopped by %dhvm live stop" if stop == "live stop" else "the session was reset"
        assert final and f"○ stopped ({why})" in final[-1]["content"]["data"]["text/plain"]
        quiet = [m for m in _iopub_until(kc, 2.5) if m["msg_type"] == "update_display_data"]
        assert quiet == []
        after = json.loads(_host(kc, census))
        if stop == "reset":
            # The server is gone, and with it its socket. The one pipe the kernel keeps for life is the
            # write end of its watchdog's (instances.ensure_watchdog), started with the first server.
            assert len(set(after.pop("pipes")) - set(before.pop("pipes"))) <= 1
        assert after == before, (before, after)  # the same sockets (and pipes), no live-view thread
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def test_restart_and_shutdown_with_a_live_view_running_leave_nothing(jupyter_path, tmp_path):
    """The view's thread must not hold up a restart or a shutdown, nor keep the old server alive."""
    from jupyter_client.manager import start_new_kernel

    from dhg_kernel.config import Layout
    from dhg_kernel.instances import alive, list_instances

    home = tmp_path / "home"
    km, kc = start_new_kernel(kernel_name="dhvm", env={**os.environ, "DHG_HOME": str(home), "DHG_BACKEND": "local"})
    try:
        reply = kc.execute_interactive("from deephaven import time_table\nrs = time_table('PT0.2S')", timeout=300,
                                       output_hook=lambda m: None)
        assert reply["content"]["status"] == "ok"
        assert [m for m in _iopub_until(kc, 2.5) if m["msg_type"] == "update_display_data"], "the view runs"
        (first,) = list_instances(Layout(home))
        km.restart_kernel(now=False)
        kc.wait_for_ready(timeout=60)
        assert not alive(first.processes[0].pid, None) and not Path(first.dir).exists()
        reply = kc.execute_interactive("from deephaven import time_table\nrs = time_table('PT0.2S')", timeout=300,
                                       output_hook=lambda m: None)
        assert reply["content"]["status"] == "ok"
        (second,) = list_instances(Layout(home))
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=False)
    deadline = time.monotonic() + 10
    while alive(second.processes[0].pid, None) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not alive(second.processes[0].pid, None)
    assert list_instances(Layout(home)) == []


def test_a_saved_notebook_keeps_the_last_snapshot_marked_stopped(jupyter_path, dhg_home, tmp_path):
    from nbclient import NotebookClient

    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("%load_ext dhg_kernel\n%config Dhvm.heap = '1g'"),
        nbformat.v4.new_code_cell("%%dhvm\nfrom deephaven import time_table\nticks = time_table('PT0.2S')"),
        nbformat.v4.new_code_cell("import time\ntime.sleep(3)"),
        nbformat.v4.new_code_cell("%dhvm reset"),
    ])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    os.environ["DHG_HOME"] = str(dhg_home)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outs = [o for o in nb.cells[1].outputs if "dhvm-live" in o.get("data", {}).get("text/html", "")]
    assert len(outs) == 1
    text = outs[0]["data"]["text/plain"]
    assert "○ stopped (the session was reset) · final snapshot at" in text, text
    assert int(re.search(r"data-rows='(\d+)'", outs[0]["data"]["text/html"]).group(1)) >= 2


def test_per_cell_mode_and_no_live_show_a_snapshot(ip):
    from IPython.utils.capture import capture_output

    with capture_output() as cap:
        ip.run_cell_magic("dhvm", "--no-live", "from deephaven import time_table\nnl = time_table('PT0.1S')")
    html = "".join(o.data.get("text/html", "") for o in cap.outputs)
    assert "ticking table: a snapshot taken at" in "".join(o.data.get("text/plain", "") for o in cap.outputs)
    assert "dhvm-live" not in html
    assert ip.magics_manager.registry["Dhvm"].session.live_views() == []


def test_show_line_magic_starts_a_view_of_a_named_table_and_a_terminal_gets_a_snapshot(jupyter_path, dhg_home, ip):
    from IPython.utils.capture import capture_output
    from jupyter_client.manager import start_new_kernel

    # A terminal IPython cannot update an output in place: it gets the snapshot, and no view runs.
    with capture_output() as cap:
        ip.run_cell_magic("dhvm", "", "from deephaven import time_table\nterm = time_table('PT0.1S')")
    assert "ticking table: a snapshot taken at" in "".join(o.data.get("text/plain", "") for o in cap.outputs)
    assert ip.magics_manager.registry["Dhvm"].session.live_views() == []

    km, kc = start_new_kernel(kernel_name="python3", env={**os.environ, "DHG_HOME": str(dhg_home),
                                                          "DHG_BACKEND": "local"})
    try:
        _host(kc, "%load_ext dhg_kernel\n%config Dhvm.heap = '1g'")
        _host(kc, "%%dhvm -q\nfrom deephaven import time_table\nshown = time_table('PT0.1S').update('X = i')")
        msgs: list = []
        reply = kc.execute_interactive("%dhvm show shown -n 3 --rate 4", timeout=60, output_hook=msgs.append)
        assert reply["content"]["status"] == "ok"
        assert any("dhvm-live" in m["content"].get("data", {}).get("text/html", "") for m in msgs)
        later = [m for m in _iopub_until(kc, 3.0) if m["msg_type"] == "update_display_data"]
        assert len(later) >= 2
        assert "last 3 rows" in later[-1]["content"]["data"]["text/plain"]
        listed = _host(kc, "print(get_ipython().run_line_magic('dhvm', 'live').to_string())")
        assert "shown" in listed
        msgs = []
        kc.execute_interactive("%dhvm show shown -n x", timeout=60, output_hook=msgs.append)
        errors = "".join(m["content"].get("text", "") + m["content"].get("evalue", "") for m in msgs)
        assert "usage: %dhvm show" in errors, msgs
        assert "stopped." in _host(kc, "%dhvm live stop shown")
        listed = _host(kc, "print(len(get_ipython().run_line_magic('dhvm', 'live')))")
        assert listed.strip() == "0"
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


@pytest.mark.qemu
def test_a_live_view_of_a_ticking_table_in_a_vm(vm):
    r = vm.execute("from deephaven import time_table\nvt = time_table('PT0.1S').update('X = i')")
    assert r.ok, r.error
    feed, got, ended = _collect(vm, "vt", rows=4)
    updates = _drain(got, 5.0)
    assert len(updates) >= 3
    counts = [u.table.rows for u in updates]
    assert counts == sorted(counts) and counts[-1] > counts[0]
    vm.reset()
    assert ended.get(timeout=5) == "the session was reset"
    assert _live_threads() == []


def test_a_view_ends_at_once_when_the_server_dies_and_the_next_cell_says_so(dhg_home):
    import signal

    from dhg_kernel.session import Session

    s = Session("local", dhg_home, heap="1g")
    try:
        s.execute("from deephaven import time_table\nkilled = time_table('PT0.2S')")
        feed, got, ended = _collect(s, "killed")
        assert _drain(got, 2.0)
        os.kill(s.info["pid"], signal.SIGKILL)
        why = ended.get(timeout=10)
        assert why.startswith("error:") and "connection to the agent lost" in why, why
        assert not feed.running and _live_threads() == []
        r = s.execute("print(1)")
        assert r.stdout.strip() == "1" and "was lost since the last cell" in r.stderr
    finally:
        s.stop()


# -- figures, saved notebooks, repeated snapshots (issue 21) --------------------------------------------

PLOTLY = "application/vnd.plotly.v1+json"
RUNNING = re.compile(r"snapshot at \d\d:\d\d:\d\d UTC \(live while the kernel runs; re-run the cell to resume\)")


def _display_id(msgs, test) -> str:
    (m,) = [m for m in msgs if m["msg_type"] == "display_data" and test(m["content"]["data"])]
    return m["content"]["transient"]["display_id"]


def test_an_assigned_ticking_figure_is_a_live_plot_and_unchanged_rows_are_not_sent_again(jupyter_path, dhg_home):
    """``fig = dx.line(ticking, ...)`` shows its plot (as an assigned table shows), which the view re-sends
    as the table grows, under a heading that says what it is; a view whose rows do not change sends nothing."""
    from jupyter_client.manager import start_new_kernel

    km, kc = start_new_kernel(kernel_name="dhvm", env={**os.environ, "DHG_HOME": str(dhg_home), "DHG_BACKEND": "local"})
    try:
        msgs: list = []
        reply = kc.execute_interactive(
            "from deephaven import time_table\nimport deephaven.plot.express as dx\n"
            "grows = time_table('PT0.2S').update('X = i')\nfig = dx.line(grows, x='Timestamp', y='X')\n"
            # a row modified every tick to the value it had: the listener fires, the rows shown stay the same
            "same = time_table('PT0.1S').update(['K = 1', 'V = 7']).last_by('K').view('V')",
            timeout=300, output_hook=msgs.append)
        assert reply["content"]["status"] == "ok", reply["content"]
        plot_id = _display_id(msgs, lambda d: PLOTLY in d)
        heading_id = _display_id(msgs, lambda d: "dhvm-figure" in d.get("text/html", ""))
        same_id = _display_id(msgs, lambda d: "data-table='same'" in d.get("text/html", ""))
        later = _iopub_until(kc, 4.0)
        updates = [m["content"]["data"] for m in later if m["msg_type"] == "update_display_data"
                   and m["content"]["transient"]["display_id"] == plot_id]
        # (each new plot follows a placeholder of its height: JupyterLab's Plotly renderer ignores an
        # update of a plot it drew, but draws anew an output whose MIME type changed)
        plots = [d[PLOTLY] for d in updates if PLOTLY in d]
        assert len(updates) - len(plots) in (len(plots), len(plots) + 1), [sorted(d) for d in updates]
        ys = [len(p["data"][0]["y"]) for p in plots]
        assert len(ys) >= 3 and ys == sorted(ys) and ys[-1] > ys[0], ys
        headings = [m["content"]["data"]["text/plain"] for m in later if m["msg_type"] == "update_display_data"
                    and m["content"]["transient"]["display_id"] == heading_id]
        assert headings and headings[-1].startswith("fig  (plotly-express figure) ") and RUNNING.search(headings[-1])
        same = [m for m in later if m["msg_type"] == "update_display_data"
                and m["content"]["transient"]["display_id"] == same_id]
        print(f"\n[live] in 4 s: {len(plots)} plot updates; {len(same)} updates of a view whose rows did not change")
        assert len(same) <= 1, [m["content"]["data"]["text/plain"] for m in same]  # (its first snapshot, at most)

        msgs = []
        kc.execute_interactive("%dhvm live stop", timeout=60, output_hook=msgs.append)
        final = [m["content"]["data"]["text/plain"] for m in msgs if m["msg_type"] == "update_display_data"
                 and m["content"]["transient"]["display_id"] == heading_id]
        assert final and "○ stopped (stopped by %dhvm live stop) · final snapshot at" in final[-1], final
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def test_a_notebook_saved_while_its_views_run_says_they_are_snapshots(jupyter_path, dhg_home, tmp_path):
    """nbclient (papermill's engine) ends with the views still running: what it saves must not claim
    to be live, since nothing updates it once saved."""
    from nbclient import NotebookClient

    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("from deephaven import time_table\nimport deephaven.plot.express as dx\n"
                                  "ticks = time_table('PT0.2S').update('X = i')\nfig = dx.line(ticks, x='Timestamp', y='X')"),
        nbformat.v4.new_code_cell("%%local\nimport time\ntime.sleep(3)"),
    ])
    nb.metadata["kernelspec"] = {"name": "dhvm", "display_name": "Deephaven microVM", "language": "python"}
    os.environ["DHG_HOME"] = str(dhg_home)
    NotebookClient(nb, timeout=300, kernel_name="dhvm", resources={"metadata": {"path": str(tmp_path)}}).execute()
    saved = nbformat.writes(nb)
    assert "● live" not in saved
    outs = nb.cells[0].outputs
    (view,) = [o for o in outs if "dhvm-live" in o.get("data", {}).get("text/html", "")]
    (heading,) = [o for o in outs if "dhvm-figure" in o.get("data", {}).get("text/html", "")]
    (plot,) = [o for o in outs if PLOTLY in o.get("data", {})]
    for out in (view, heading):
        text = out["data"]["text/plain"]
        assert RUNNING.search(text) or "○ stopped" in text, text
    assert int(re.search(r"data-rows='(\d+)'", view["data"]["text/html"]).group(1)) >= 2  # updated meanwhile
    assert len(plot["data"][PLOTLY]["data"][0]["y"]) >= 2
