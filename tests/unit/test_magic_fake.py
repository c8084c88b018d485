"""The %%dhvm magic on the fake backend (tests/fakes), through IPython's own run_cell_magic and
run_line_magic: cells, status, stop, reset, sessions, help and bad input. No JVM."""

from __future__ import annotations

import pytest
from IPython.core.error import UsageError as IPythonUsageError
from IPython.core.interactiveshell import InteractiveShell

from backend import install
from dhg_kernel.errors import UsageError

install()

PID = "import os\nos.getpid()"


@pytest.fixture
def ip(tmp_path):
    """An IPython shell with the extension loaded and the fake backend configured (as %config would)."""
    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "dhg_kernel")
    magics = shell.magics_manager.registry["Dhvm"]
    magics.backend = "fake"
    magics.config_dir = str(tmp_path / "home")
    magics.mode = "per-session"
    yield shell
    magics.close()


def cell(ip, code: str, line: str = ""):
    return ip.run_cell_magic("dhvm", line, code)


def test_cells_share_one_server_and_stream_their_output(ip, capsys):
    cell(ip, "x = 2\nprint('from the agent')")
    assert "from the agent" in capsys.readouterr().out
    assert cell(ip, "x * 21").data["text/plain"] == "42"
    assert ip.user_ns["_dhvm"].error is None  # the last result is bound in the notebook


def test_per_cell_flag_runs_the_cell_in_a_fresh_server(ip):
    mine = cell(ip, PID).data["text/plain"]
    fresh = cell(ip, PID, "--per-cell").data["text/plain"]
    assert fresh != mine and cell(ip, PID).data["text/plain"] == mine


def test_status_says_the_backend_and_whether_a_server_runs(ip, capsys):
    ip.run_line_magic("dhvm", "status")
    out = capsys.readouterr().out
    assert "backend: fake" in out and "running: False" in out
    cell(ip, "1")
    ip.run_line_magic("dhvm", "status")
    out = capsys.readouterr().out
    assert "running: True" in out and "deephaven_version: 0.0.0-fake" in out


def test_stop_ends_the_server_and_the_next_cell_starts_a_fresh_one(ip, capsys):
    before = cell(ip, "y = 1\n" + PID).data["text/plain"]
    ip.run_line_magic("dhvm", "stop")
    assert "dhvm: stopped." in capsys.readouterr().out
    assert cell(ip, PID).data["text/plain"] != before
    with pytest.raises(Exception, match="y"):  # the variable went with the server
        cell(ip, "y")


def test_reset_discards_the_server(ip, capsys):
    before = cell(ip, PID).data["text/plain"]
    ip.run_line_magic("dhvm", "reset")
    assert "next cell starts a fresh one" in capsys.readouterr().out
    assert cell(ip, PID).data["text/plain"] != before


def test_sessions_lists_the_main_and_named_sessions(ip):
    cell(ip, "1")
    cell(ip, "2", "-s other")
    table = ip.run_line_magic("dhvm", "sessions")
    assert list(table["session"]) == ["main", "other"]
    assert list(table["running"]) == [True, True] and set(table["backend"]) == {"fake"}


def test_a_dead_server_is_shown_as_ended_and_replaced_by_the_next_cell(ip, capsys):
    before = cell(ip, "import threading\nthreading.Timer(0.05, fake_agent.die).start()\n" + PID).data["text/plain"]
    magics = ip.magics_manager.registry["Dhvm"]
    magics.session.instance.proc.wait(timeout=5)
    table = ip.run_line_magic("dhvm", "sessions")
    assert list(table["running"]) == [False] and "connection to the agent lost" in table["ended"][0]
    after = cell(ip, PID).data["text/plain"]
    assert after != before


def test_an_agent_dying_mid_cell_is_an_error_of_that_cell(ip):
    with pytest.raises(Exception, match="died during the cell"):
        cell(ip, "fake_agent.die()")
    assert cell(ip, "'again'").data["text/plain"] == "'again'"


def test_help_lists_the_commands(ip):
    doc = ip.find_line_magic("dhvm").__doc__
    for command in ("status", "stop", "reset", "sessions"):
        assert command in doc


def test_bad_options_are_usage_errors(ip):
    with pytest.raises(IPythonUsageError, match="--bogus"):
        cell(ip, "1", "--bogus")
    with pytest.raises(UsageError, match="not a valid Python name"):
        cell(ip, "1", "-o 1x")
    with pytest.raises(UsageError, match=r"usage: %dhvm checkpoint NAME"):
        ip.run_line_magic("dhvm", "checkpoint")
    with pytest.raises(UsageError, match=r"usage: %dhvm live"):
        ip.run_line_magic("dhvm", "live stop a b")
    with pytest.raises(UsageError, match="usage: %dhvm sessions"):
        ip.run_line_magic("dhvm", "sessions extra")


def test_an_unknown_session_or_command_is_a_clear_error(ip):
    with pytest.raises(UsageError, match="no session named 'nope'.*%%dhvm -s nope"):
        ip.run_line_magic("dhvm", "-s nope tables")
    with pytest.raises(Exception, match="frobnicate"):  # not a command: it says which name it did not know
        ip.run_line_magic("dhvm", "frobnicate")


def test_checkpoints_are_refused_with_the_reason(ip):
    cell(ip, "1")
    with pytest.raises(Exception, match="cannot save or restore checkpoints"):
        ip.run_line_magic("dhvm", "checkpoint one")
