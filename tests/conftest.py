"""Shared fixtures: real Deephaven servers (local backend) started once per test session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def dhg_home(tmp_path_factory) -> Path:
    """A DHG_HOME of the test session's own (run dirs, sockets, logs)."""
    home = tmp_path_factory.mktemp("dhg-home")
    os.environ["DHG_HOME"] = str(home)
    return home


@pytest.fixture(scope="session")
def session(dhg_home):
    """One Deephaven agent (local backend) shared by the agent-level tests."""
    from dhg_kernel.session import Session

    s = Session("local", dhg_home, heap="1g")
    s.start()
    yield s
    s.stop()


@pytest.fixture(scope="session")
def ip(dhg_home):
    """An IPython shell with ``%load_ext dhg_kernel`` done."""
    from IPython.testing.globalipapp import start_ipython

    shell = start_ipython()
    shell.run_line_magic("load_ext", "dhg_kernel")
    shell.run_line_magic("config", f"Dhvm.config_dir = {str(dhg_home)!r}")
    shell.run_line_magic("config", "Dhvm.heap = '1g'")
    yield shell
    shell.run_line_magic("dhvm", "stop")


@pytest.fixture
def workspace(tmp_path, monkeypatch) -> Path:
    """A notebook working directory with a small CSV under data/."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "trades.csv").write_text("sym,px,qty\nAAPL,1.5,10\nMSFT,2.5,20\nGOOG,3.5,30\n")
    monkeypatch.chdir(tmp_path)
    return tmp_path
