"""Per-session and per-cell modes, and the warm pool that hides per-cell start-up."""

from __future__ import annotations

import time

import pytest
from IPython.utils.capture import capture_output

from dhg_kernel.config import Layout
from dhg_kernel.instances import list_instances
from dhg_kernel.session import DhvmError, Session

pytestmark = pytest.mark.slow


@pytest.fixture
def per_cell(tmp_path):
    s = Session("local", tmp_path, mode="per-cell", pool_size=1, heap="512m")
    yield s
    s.stop()
    assert list_instances(Layout(tmp_path)) == [], "stop() leaves no instance behind"


def test_per_cell_mode_gives_each_cell_a_fresh_server(per_cell):
    r1 = per_cell.execute("from deephaven import empty_table\nonly_here = empty_table(2)\nprint('pid', __import__('os').getpid())")
    assert r1.ok and [t.name for t in r1.tables] == ["only_here"]
    r2 = per_cell.execute("print('only_here' in globals(), 'pid', __import__('os').getpid())")
    assert r2.stdout.split()[0] == "False"
    assert r1.stdout.split()[-1] != r2.stdout.split()[-1], "a different server process"
    assert r1.backend != r2.backend


def test_per_cell_instances_are_destroyed_after_their_cell(per_cell, tmp_path):
    r = per_cell.execute("x = 1")
    used = r.backend.split("(")[1].rstrip(")")
    ids = {rec.id for rec in list_instances(Layout(tmp_path))}
    assert used not in ids, "the cell's VM is gone once its results are in"


def test_warm_pool_serves_the_next_cell_without_a_visible_start(per_cell):
    per_cell.execute("x = 1")  # cold: starts in front of the user, then the pool refills
    deadline = time.monotonic() + 120
    while per_cell.pool.describe()["ready"] < 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert per_cell.pool.describe()["ready"] == 1
    r = per_cell.execute("y = 2")
    st = per_cell.pool.describe()
    assert st["served_warm"] >= 1
    print(f"warm per-cell start: {r.timings['start_ms']:.1f} ms")
    assert r.timings["start_ms"] < r.timings["total_ms"]


def test_tables_need_a_session_server_and_say_so(per_cell):
    with pytest.raises(DhvmError, match="per-cell mode"):
        per_cell.tables()


def test_o_binds_a_per_cell_table_before_its_server_goes(ip, tmp_path):
    with capture_output():
        res = ip.run_cell("%%dhvm --per-cell -n 3 -o made\nfrom deephaven import empty_table\n"
                          "made = empty_table(50).update('X = i')")
    assert res.success and len(ip.user_ns["made"]) == 50


def test_one_per_cell_cell_leaves_the_session_state_alone(ip):
    with capture_output() as cap:
        ip.run_cell("%%dhvm\nsession_var = 'kept'")
        ip.run_cell("%%dhvm --per-cell\nprint('session_var' in globals())")
        ip.run_cell("%%dhvm\nprint(session_var)")
    assert cap.stdout.split() == ["False", "kept"]


def test_config_switches_the_mode(ip):
    with capture_output() as cap:
        ip.run_cell("%%dhvm\nsticky = 1")
        ip.run_line_magic("config", "Dhvm.mode = 'per-cell'")
        try:
            ip.run_cell("%%dhvm\nprint('sticky' in globals())")
            ip.run_cell("%dhvm status")
        finally:
            ip.run_line_magic("config", "Dhvm.mode = 'per-session'")
    assert cap.stdout.splitlines()[0] == "False" and "mode: per-cell" in cap.stdout
