"""The guest agent against a real Deephaven server (local backend): exec, streaming, errors,
tables of every dtype, pushed files, cancel, and malformed input."""

from __future__ import annotations

import socket
import time

import pandas as pd
import pytest

from dhg_kernel import protocol as P
from dhg_kernel.files import PushFile, scan
from dhg_kernel.vm.base import connect_unix

pytestmark = pytest.mark.slow


def test_stdout_is_streamed_while_the_cell_runs_in_order(session):
    events = []
    t0 = time.monotonic()
    r = session.execute(
        "import sys, time\nprint('one')\nprint('two', file=sys.stderr)\ntime.sleep(0.6)\nprint('three')",
        on_stdout=lambda s: events.append(("out", s, time.monotonic())),
        on_stderr=lambda s: events.append(("err", s, time.monotonic())))
    t_end = time.monotonic()
    assert r.ok, r.error
    texts = [(k, s) for k, s, _ in events if s.strip()]
    assert texts == [("out", "one"), ("err", "two"), ("out", "three")]
    first = next(t for k, s, t in events if s == "one")
    assert t_end - first >= 0.5, "the first line must arrive before the cell finishes"
    assert r.stdout == "one\nthree\n" and r.stderr == "two\n"
    assert t_end - t0 >= 0.6


def test_errors_carry_the_remote_traceback(session):
    r = session.execute("def f():\n    return 1 / 0\n\nf()")
    assert r.status == "error" and r.error.name == "ZeroDivisionError"
    tb = "".join(r.error.traceback)
    assert "return 1 / 0" in tb and "in f" in tb
    assert "agent.py" not in tb, "the agent's own frames are hidden"


def test_syntax_errors_are_reported(session):
    r = session.execute("x = (")
    assert r.error.name == "SyntaxError"


def test_state_persists_across_cells_in_one_session(session):
    assert session.execute("counter = 41").ok
    r = session.execute("counter += 1\nprint(counter)")
    assert r.stdout.strip() == "42"


def test_created_and_rebound_tables_come_back_but_untouched_ones_do_not(session):
    r = session.execute("from deephaven import empty_table\nta = empty_table(3).update('X = i')\ntb = empty_table(1)")
    assert [t.name for t in r.tables] == ["ta", "tb"]
    r = session.execute("ta = ta.update('Y = X * 2')\nz = 5")
    assert [t.name for t in r.tables] == ["ta"]
    assert list(r.tables[0].df.columns) == ["X", "Y"]


def test_last_expression_table_comes_back(session):
    r = session.execute("from deephaven import empty_table\nempty_table(4).update('V = i * 10')")
    assert len(r.tables) == 1 and r.tables[0].name.startswith("empty_table(4)")
    assert r.tables[0].df["V"].tolist() == [0, 10, 20, 30]


def test_every_dtype_survives_the_trip_to_pandas(session):
    code = """
from deephaven import empty_table
dtypes = empty_table(3).update([
    "B8 = (byte)i", "I16 = (short)(i * 100)", "I32 = i == 1 ? NULL_INT : i", "I64 = (long)i * 10000000000L",
    "F32 = (float)(i / 2.0)", "F64 = i == 0 ? NULL_DOUBLE : i * 1.5",
    "Flag = i == 2 ? null : (i % 2 == 0)", "Str = i == 1 ? null : `s` + i",
    "Ts = i == 0 ? null : '2024-03-01T12:00:00Z' + 'PT1s' * i", "Ch = (char)(65 + i)",
])
"""
    r = session.execute(code)
    assert r.ok, r.error
    df = r.table("dtypes").df
    assert str(df["B8"].dtype) == "Int8" and str(df["I16"].dtype) == "Int16"
    assert str(df["I32"].dtype) == "Int32" and df["I32"].isna().tolist() == [False, True, False]
    assert str(df["I64"].dtype) == "Int64" and df["I64"].tolist() == [0, 10_000_000_000, 20_000_000_000]
    assert str(df["F32"].dtype) == "float32" and str(df["F64"].dtype) == "float64"
    assert pd.isna(df["F64"][0]) and df["F64"][2] == 3.0
    assert str(df["Flag"].dtype) == "boolean" and df["Flag"].tolist()[:2] == [True, False] and pd.isna(df["Flag"][2])
    assert pd.api.types.is_string_dtype(df["Str"]) and pd.isna(df["Str"][1]) and df["Str"][2] == "s2"
    assert str(df["Ts"].dtype) == "datetime64[ns, UTC]" and pd.isna(df["Ts"][0])
    assert df["Ts"][1] == pd.Timestamp("2024-03-01T12:00:01Z")
    assert str(df["Ch"].dtype) == "string" and all(isinstance(c, str) and len(c) == 1 for c in df["Ch"].dropna())


def test_max_rows_truncates_and_reports_the_full_size(session):
    r = session.execute("from deephaven import empty_table\nbig = empty_table(5000).update('X = i')", max_rows=100)
    t = r.table("big")
    assert t.truncated and t.rows == 5000 and t.arrow.num_rows == 100
    full = session.fetch("big", None)
    assert not full.truncated and len(full.df) == 5000


def test_pushed_files_are_read_by_deephaven_and_not_resent(session, workspace):
    code = 'from deephaven import read_csv\ntrades = read_csv("data/trades.csv")\nprint(trades.size)'
    files = scan(code, workspace).files
    r = session.execute(code, files)
    assert r.ok, r.error
    assert r.files == ["data/trades.csv"] and r.stdout.strip() == "3"
    assert r.table("trades").df["sym"].tolist() == ["AAPL", "MSFT", "GOOG"]
    again = session.execute(code, files)
    assert again.files == [], "an unchanged file is not sent twice"
    (workspace / "data" / "trades.csv").write_text("sym,px,qty\nIBM,9.5,1\n")
    changed = session.execute(code, scan(code, workspace).files)
    assert changed.files == ["data/trades.csv"] and changed.stdout.strip() == "1"


def test_a_file_that_was_not_pushed_is_not_there(session, workspace):
    r = session.execute('import os\nprint(os.path.exists("data/never-pushed.csv"))')
    assert r.stdout.strip() == "False"


@pytest.mark.parametrize("path", ["/etc/evil.csv", "../evil.csv", "a/../../evil.csv", ""])
def test_agent_refuses_paths_outside_its_workdir(session, tmp_path, path):
    f = tmp_path / "x.csv"
    f.write_text("x")
    r = session.execute("print('ran')", [PushFile(rel=path, path=f, size=1)])
    assert r.status == "error" and r.error.name == "FileRejected"
    assert r.stdout == "", "the cell must not run when a file is refused"


def test_timeout_cancels_the_cell_and_the_session_stays_usable(session):
    session.execute("alive = 'yes'")
    t0 = time.monotonic()
    r = session.execute("import time\ntime.sleep(30)", timeout=0.5)
    assert time.monotonic() - t0 < 3
    assert r.status == "cancelled" and "timed out" in r.error.value
    assert session.execute("print(alive)").stdout.strip() == "yes"


def test_tables_and_stats_requests(session):
    session.execute("from deephaven import empty_table\nlisted = empty_table(7)")
    names = {t["name"]: t for t in session.tables()}
    assert names["listed"]["rows"] == 7
    st = session.stats()
    assert st["cells"] >= 1 and st["heap_max"] > 0


def _raw(session) -> socket.socket:
    return connect_unix(session.instance.dir / "agent.sock", 5)


def test_garbage_gets_an_error_frame_and_the_agent_survives(session):
    with _raw(session) as sock:
        sock.sendall(b"this is not a frame at all\n")
        f = P.FrameStream(sock).recv(timeout=10)
        assert f.header["ev"] == P.EV_ERROR and f.header["name"] == "ProtocolError"
    assert session.execute("print('still here')").stdout.strip() == "still here"


def test_bad_header_is_answered_and_the_connection_goes_on(session):
    import struct

    with _raw(session) as sock:
        junk = b"{oops"
        sock.sendall(P.MAGIC + struct.pack(">IH", len(junk), 0) + junk)
        s = P.FrameStream(sock)
        assert s.recv(timeout=10).header["name"] == "ProtocolError"
        s.send({"op": P.OP_HELLO, "id": 1, "version": P.PROTOCOL_VERSION})
        done = s.recv(timeout=10).header
        assert done["ev"] == P.EV_DONE and done["deephaven_version"] == "42.7"


def test_version_mismatch_is_reported(session):
    with _raw(session) as sock:
        s = P.FrameStream(sock)
        s.send({"op": P.OP_HELLO, "id": 1, "version": 999})
        err = s.recv(timeout=10).header
        assert err["name"] == "VersionMismatch" and "999" in err["value"]


def test_unknown_op_is_an_error_not_a_crash(session):
    with _raw(session) as sock:
        s = P.FrameStream(sock)
        s.send({"op": "format_disk", "id": 3})
        assert s.recv(timeout=10).header["name"] == "UnknownOperation"


def test_after_restore_reseeds_random_state(session):
    import os

    before = session.execute("import random\nprint(random.random())").stdout
    with _raw(session) as sock:
        s = P.FrameStream(sock)
        s.send({"op": P.OP_RESTORED, "id": 1, "time_ns": time.time_ns()}, [os.urandom(64)])
        done = s.recv(timeout=10).header
    assert done["entropy_bytes"] == 64 and abs(done["clock_skew_ms"]) < 5000
    assert session.execute("import random\nprint(random.random())").stdout != before
