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
def shell(tmp_path):
    """An IPython shell with the extension loaded and the fake backend configured (as %config would)."""
    ip = InteractiveShell.instance()
    ip.run_line_magic("load_ext", "dhg_kernel")
    magics = ip.magics_manager.registry["Dhvm"]
    saved = {k: getattr(magics, k) for k in ("backend", "config_dir", "mode")}
    magics.backend = "fake"
    magics.config_dir = str(tmp_path / "home")
    magics.mode = "per-session"
    yield ip
    magics.close()
    for k, v in saved.items():  # the shell is a singleton: later tests get the magic as it was
        setattr(magics, k, v)


def cell(shell, code: str, line: str = ""):
    return shell.run_cell_magic("dhvm", line, code)


def test_cells_share_one_server_and_stream_their_output(shell, capsys):
    cell(shell, "x = 2\nprint('from the agent')")
    assert "from the agent" in capsys.readouterr().out
    assert cell(shell, "x * 21").data["text/plain"] == "42"
    assert shell.user_ns["_dhvm"].error is None  # the last result is bound in the notebook


def test_per_cell_flag_runs_the_cell_in_a_fresh_server(shell):
    mine = cell(shell, PID).data["text/plain"]
    fresh = cell(shell, PID, "--per-cell").data["text/plain"]
    assert fresh != mine and cell(shell, PID).data["text/plain"] == mine


def test_status_says_the_backend_and_whether_a_server_runs(shell, capsys):
    shell.run_line_magic("dhvm", "status")
    out = capsys.readouterr().out
    assert "backend: fake" in out and "running: False" in out
    cell(shell, "1")
    shell.run_line_magic("dhvm", "status")
    out = capsys.readouterr().out
    assert "running: True" in out and "deephaven_version: 0.0.0-fake" in out


def test_stop_ends_the_server_and_the_next_cell_starts_a_fresh_one(shell, capsys):
    before = cell(shell, "y = 1\n" + PID).data["text/plain"]
    shell.run_line_magic("dhvm", "stop")
    assert "dhvm: stopped." in capsys.readouterr().out
    assert cell(shell, PID).data["text/plain"] != before
    with pytest.raises(Exception, match="y"):  # the variable went with the server
        cell(shell, "y")


def test_reset_discards_the_server(shell, capsys):
    before = cell(shell, PID).data["text/plain"]
    shell.run_line_magic("dhvm", "reset")
    assert "next cell starts a fresh one" in capsys.readouterr().out
    assert cell(shell, PID).data["text/plain"] != before


def test_sessions_lists_the_main_and_named_sessions(shell):
    cell(shell, "1")
    cell(shell, "2", "-s other")
    table = shell.run_line_magic("dhvm", "sessions")
    assert list(table["session"]) == ["main", "other"]
    assert list(table["running"]) == [True, True] and set(table["backend"]) == {"fake"}


def test_a_dead_server_is_shown_as_ended_and_replaced_by_the_next_cell(shell, capsys):
    before = cell(shell, "import threading\nthreading.Timer(0.05, fake_agent.die).start()\n" + PID).data["text/plain"]
    magics = shell.magics_manager.registry["Dhvm"]
    magics.session.instance.proc.wait(timeout=5)
    table = shell.run_line_magic("dhvm", "sessions")
    assert list(table["running"]) == [False] and "connection to the agent lost" in table["ended"][0]
    after = cell(shell, PID).data["text/plain"]
    assert after != before


def test_an_agent_dying_mid_cell_is_an_error_of_that_cell(shell):
    with pytest.raises(Exception, match="died during the cell"):
        cell(shell, "fake_agent.die()")
    assert cell(shell, "'again'").data["text/plain"] == "'again'"


def test_help_lists_the_commands(shell, capsys):
    from dhg_kernel.commands import COMMANDS

    doc = shell.find_line_magic("dhvm").__doc__
    for command in ("status", "stop", "reset", "sessions"):
        assert command in doc
    shell.run_line_magic("dhvm", "help")
    listed = capsys.readouterr().out
    for name, command in COMMANDS.items():  # every command of the table, its arguments and what it does
        assert f"%dhvm {name} {command.args}".rstrip() + f"\n      {command.does}" in listed
    assert "%%dhvm [OPTIONS] runs a cell" in listed
    with pytest.raises(UsageError, match="usage: %dhvm status"):
        shell.run_line_magic("dhvm", "status now")


def test_a_named_session_is_the_same_for_the_magic_and_the_kernel(shell):
    """The kernel answers Tab in a %%dhvm -s b cell from the registry the magic runs cells in."""
    magics = shell.magics_manager.registry["Dhvm"]
    cell(shell, "x = 1", "-s b")
    assert magics.sessions.existing("b") is magics.sessions.get("b") is not None
    assert magics.sessions.existing("nope") is None
    assert magics.sessions.existing(None) is magics.sessions.get("main")
    shell.run_line_magic("dhvm", "-s b stop")
    assert "b" not in magics.sessions


def test_bad_options_are_usage_errors(shell):
    with pytest.raises(IPythonUsageError, match="--bogus"):
        cell(shell, "1", "--bogus")
    with pytest.raises(UsageError, match="not a valid Python name"):
        cell(shell, "1", "-o 1x")
    with pytest.raises(UsageError, match=r"usage: %dhvm checkpoint NAME"):
        shell.run_line_magic("dhvm", "checkpoint")
    with pytest.raises(UsageError, match=r"usage: %dhvm live"):
        shell.run_line_magic("dhvm", "live stop a b")
    with pytest.raises(UsageError, match="usage: %dhvm sessions"):
        shell.run_line_magic("dhvm", "sessions extra")
    with pytest.raises(UsageError, match=r"unrecognized arguments: --bogus; usage: %dhvm fetch NAME"):
        shell.run_line_magic("dhvm", "fetch t --bogus")
    with pytest.raises(UsageError, match=r"--format, --force and -q go with --to FILE"):
        shell.run_line_magic("dhvm", "fetch t --force")
    with pytest.raises(UsageError, match=r"usage: %dhvm show NAME"):
        shell.run_line_magic("dhvm", "show")


def test_an_unknown_session_or_command_is_a_clear_error(shell):
    with pytest.raises(UsageError, match="no session named 'nope'.*%%dhvm -s nope"):
        shell.run_line_magic("dhvm", "-s nope tables")
    with pytest.raises(Exception, match="frobnicate"):  # not a command: run as code, which names it
        shell.run_line_magic("dhvm", "frobnicate")


def test_checkpoints_are_refused_with_the_reason(shell):
    cell(shell, "1")
    with pytest.raises(Exception, match="cannot save or restore checkpoints"):
        shell.run_line_magic("dhvm", "checkpoint one")
