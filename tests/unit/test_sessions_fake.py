"""Sessions on the fake backend (tests/fakes): server reuse, per-cell servers, an agent that dies or hangs,
timeouts, files pushed once. No JVM: each test takes a fraction of a second (the hung agent: the cancel
grace, CANCEL_GRACE_S)."""

from __future__ import annotations

from pathlib import Path

import pytest

from backend import install
from dhg_kernel.files import PushFile
from dhg_kernel.session import Session

install()

PID = "import os\nos.getpid()"


@pytest.fixture
def make_session(tmp_path):
    made: list[Session] = []

    def make(mode: str = "per-session", **options) -> Session:
        s = Session("fake", tmp_path / "home", mode=mode, pool_size=0, **options)
        made.append(s)
        return s

    yield make
    for s in made:
        s.stop()


def run(s: Session, code: str, files=(), **kw):
    """Execute ``code`` (pushing ``files``); returns the result and what went to stderr while it ran."""
    err: list[str] = []
    result = s.execute(code, files, on_stderr=err.append, **kw)
    return result, "".join(err)


def value(result) -> str:
    assert result.error is None, result.error
    return result.value["text/plain"]


def test_per_session_mode_reuses_one_server(make_session):
    s = make_session()
    first, _ = run(s, "x = 41\nprint('hello')\n" + PID)
    assert first.stdout == "hello\n"
    second, _ = run(s, "x + 1")
    assert value(second) == "42"  # the first cell's variable is still there
    third, _ = run(s, PID)
    assert value(third) == value(first)
    assert len(s.backend.started) == 1


def test_per_cell_mode_gives_each_cell_a_fresh_server(make_session):
    s = make_session("per-cell")
    first, _ = run(s, "x = 1\n" + PID)
    second, _ = run(s, PID)
    assert value(first) != value(second)
    third, _ = run(s, "x")
    assert third.error is not None and third.error.name == "NameError"  # nothing outlives its cell
    assert len(s.backend.started) == 3
    assert not any(i.alive() for i in s.backend.started)  # each server went with its cell
    assert not s.running


def test_a_cell_can_override_the_mode(make_session):
    s = make_session()
    mine, _ = run(s, PID)
    fresh, _ = run(s, PID, mode="per-cell")
    again, _ = run(s, PID)
    assert value(fresh) != value(mine) and value(again) == value(mine)


def test_an_agent_dying_mid_cell_fails_that_cell_and_the_next_runs_on_a_fresh_server(make_session):
    s = make_session()
    before, _ = run(s, "x = 1\n" + PID)
    died, _ = run(s, "print('about to die')\nfake_agent.die()")
    assert died.status == "error" and died.error.name == "AgentDied"
    assert "died during the cell" in died.error.value and "next cell starts a fresh server" in died.error.value
    assert died.stdout == "about to die\n"  # what came before the death is kept
    after, told = run(s, PID)
    assert value(after) != value(before)
    assert told == ""  # the dead cell's error said it already
    lost, _ = run(s, "x")
    assert lost.error.name == "NameError"


def test_an_agent_dying_between_cells_is_announced_in_the_next_cell(make_session):
    s = make_session()
    before, _ = run(s, "import threading\nthreading.Timer(0.05, fake_agent.die).start()\n" + PID)
    s.backend.started[0].proc.wait(timeout=5)
    after, told = run(s, PID)
    assert told.startswith("dhvm: the session's VM was lost since the last cell")
    assert "fresh VM" in told and told.endswith("\n")
    assert after.stderr.startswith("dhvm: ")  # the result keeps it too
    assert value(after) != value(before)
    _, again = run(s, "1")
    assert again == ""  # told once
    assert s.summary()["running"] is True


def test_a_timeout_cancels_the_cell_and_keeps_the_server(make_session):
    s = make_session()
    before, _ = run(s, "x = 5\n" + PID)
    slow, _ = run(s, "import time\ntime.sleep(30)", timeout=0.2)
    assert slow.status == "cancelled"
    assert "timed out after 0.2s" in slow.error.value
    after, _ = run(s, "x\n")
    assert value(after) == "5"  # same server, state kept
    assert len(s.backend.started) == 1


def test_a_hung_agent_is_replaced_after_the_cancel_grace(make_session):
    s = make_session()
    before, _ = run(s, "x = 5\n" + PID)
    hung, _ = run(s, "fake_agent.hang()", timeout=0.1)
    assert hung.status == "cancelled"
    assert "did not stop" in hung.error.value and "replaced" in hung.error.value
    assert not s.backend.started[0].alive()  # the stuck one was killed
    after, _ = run(s, PID)
    assert value(after) != value(before)


def test_a_slow_agent_still_answers(make_session):
    s = make_session(delay=0.1, hello_delay=0.05)
    result, _ = run(s, "6 * 7", timeout=5)
    assert value(result) == "42"
    assert result.timings["roundtrip_ms"] >= 100
    assert s.stats()["cells"] == 1


def test_files_are_pushed_once_and_again_only_when_changed(make_session, tmp_path):
    s = make_session()
    data = tmp_path / "data.csv"
    data.write_text("a,b\n1,2\n")
    push = lambda: [PushFile("data.csv", data, data.stat().st_size)]  # noqa: E731
    first, _ = run(s, "print(open('data.csv').read(), end='')", push())
    assert first.files == ["data.csv"] and first.stdout == "a,b\n1,2\n"
    second, _ = run(s, "print(fake_agent.received)", push())
    assert second.files == [] and second.stdout == "['data.csv']\n"  # unchanged: not sent again
    data.write_text("a,b\n3,4\n")
    third, _ = run(s, "print(open('data.csv').read(), end='')", push())
    assert third.files == ["data.csv"] and third.stdout == "a,b\n3,4\n"
    assert s.status()["files_pushed"] == 1


def test_files_are_pushed_again_to_a_replacement_server(make_session, tmp_path):
    s = make_session()
    data = tmp_path / "data.csv"
    data.write_text("x\n")
    push = [PushFile("data.csv", data, data.stat().st_size)]
    assert run(s, "1", push)[0].files == ["data.csv"]
    run(s, "fake_agent.die()")
    again, _ = run(s, "open('data.csv').read()", push)
    assert again.files == ["data.csv"] and value(again) == repr("x\n")


def test_cell_errors_come_back_with_their_name_and_the_session_goes_on(make_session):
    s = make_session()
    bad, _ = run(s, "1/0")
    assert bad.status == "error" and bad.error.name == "ZeroDivisionError"
    ok, _ = run(s, "'fine'")
    assert value(ok) == "'fine'"


def test_tables_stats_and_stop(make_session):
    s = make_session()
    run(s, "t = FakeTable(a=[1, 2, 3])")
    assert [(t["name"], t["rows"]) for t in s.tables()] == [("t", 3)]
    assert s.stats()["tables"] == 1
    inst = s.backend.started[0]
    s.stop()
    assert not s.running and not inst.alive() and not Path(inst.dir).exists()
    assert s.status()["running"] is False


def test_completion_and_inspection_come_from_the_live_namespace(make_session):
    s = make_session()
    assert s.complete("tot", 3)["matches"] == []  # no server yet: nothing to ask, and none is started
    assert not s.running
    run(s, "total_rows = 3")
    got = s.complete("x = tot", 7)
    assert got["matches"] == ["total_rows"] and (got["cursor_start"], got["cursor_end"]) == (4, 7)
    assert s.inspect("total_rows", 10)["found"] is True
    assert s.inspect("missing", 7)["found"] is False


def test_an_option_no_backend_takes_is_refused_not_dropped(tmp_path):
    """Backends ignore each other's options, so Session checks the names: a typo, or an old name, is an error."""
    from dhg_kernel.errors import UsageError
    from dhg_kernel.vm import OPTIONS, constructor_options
    from dhg_kernel.vm.firecracker import FirecrackerBackend
    from dhg_kernel.vm.local import LocalBackend
    from dhg_kernel.vm.qemu import QemuBackend

    assert OPTIONS == set().union(*(constructor_options(b) for b in (LocalBackend, QemuBackend, FirecrackerBackend)))
    with pytest.raises(UsageError, match=r"unknown backend option snapshot \(snapshot is now start_from\)"):
        Session("qemu", tmp_path, snapshot="loaded")
    with pytest.raises(UsageError, match=r"unknown backend option hep; the options are: .*heap"):
        Session("local", tmp_path, hep="1g")
    Session("fake", tmp_path, delay=0.1, start_from=None)  # a registered backend's own options are known
