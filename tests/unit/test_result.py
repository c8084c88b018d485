"""CellEvents: the one place where an exec request's events become a CellResult (no server needed:
the frames are the ones the agent sends, with a real Arrow IPC payload)."""

from __future__ import annotations

import pyarrow as pa

from dhg_kernel import protocol as P
from dhg_kernel.result import CellEvents, CellResult


def _ipc(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return sink.getvalue().to_pybytes()


def test_events_become_one_result_and_stream_as_they_come():
    seen: list[tuple[str, object]] = []
    result = CellResult()
    events = CellEvents(result, "numpy_nullable", on_stdout=lambda t: seen.append(("out", t)),
                        on_stderr=lambda t: seen.append(("err", t)), on_display=lambda d: seen.append(("display", d.kind)),
                        bundle=lambda data: {**data, "text/plain": data.get("text/plain", "").upper()})
    arrow = pa.table({"X": pa.array([1, 2, 3], pa.int32()), "S": ["a", None, "c"]})
    frames = [
        P.Frame({"ev": P.EV_STDOUT, "re": 1, "text": "hello "}, []),
        P.Frame({"ev": P.EV_STDOUT, "re": 1, "text": "world\n"}, []),
        P.Frame({"ev": P.EV_STDERR, "re": 1, "text": "careful\n"}, []),
        P.Frame({"ev": P.EV_DISPLAY, "re": 1, "data": {"text/plain": "shown", "image/png": {"$payload": 0}}}, [b"\x89PNG"]),
        P.Frame({"ev": P.EV_TABLE, "re": 1, "name": "t", "rows": 3, "columns": [{"name": "X", "type": "int"}],
                 "refreshing": True, "snapshot_ns": 1_700_000_000_000_000_000}, [_ipc(arrow)]),
        P.Frame({"ev": P.EV_TABLE, "re": 1, "name": "d", "rows": 3, "display": True}, [_ipc(arrow)]),
        P.Frame({"ev": P.EV_RESULT, "re": 1, "data": {"text/plain": "42"}}, []),
        P.Frame({"ev": P.EV_CLEAR, "re": 1, "wait": True}, []),
    ]
    for f in frames:
        events(f)
    assert seen[:3] == [("out", "hello "), ("out", "world\n"), ("err", "careful\n")]
    assert [k for k, _ in seen[3:]] == ["display"] * 3 and [v for _, v in seen[3:]] == ["display", "table", "clear"]
    done = events.finish({"ev": P.EV_DONE, "re": 1, "status": "ok"})
    assert done is result and result.ok
    assert result.stdout == "hello world\n" and result.stderr == "careful\n"
    assert result.value == {"text/plain": "42"}  # bundle() rewrote it: "42".upper()
    assert result.displays[0].data["text/plain"] == "SHOWN" and result.displays[0].data["image/png"] == "iVBORw=="
    (t,) = result.tables
    assert t.name == "t" and t.refreshing and t.snapshot_time.year == 2023
    assert t.df["X"].tolist() == [1, 2, 3] and str(t.df["X"].dtype) == "Int32"
    assert result.displays[1].table.name == "d", "a displayed table is a display, not a result table"


def test_an_error_event_fails_the_cell_and_a_lost_agent_keeps_what_streamed():
    result = CellResult()
    events = CellEvents(result)
    events(P.Frame({"ev": P.EV_STDOUT, "re": 1, "text": "partial"}, []))
    events(P.Frame({"ev": P.EV_ERROR, "re": 1, "name": "NameError", "value": "x", "traceback": ["tb"],
                    "summary": ["NameError: x"]}, []))
    events.finish({"ev": P.EV_DONE, "re": 1, "status": "error"})
    assert not result.ok and result.status == "error" and result.error.name == "NameError"
    assert result.error.summary == ["NameError: x"]

    lost = CellResult(status="error")
    events = CellEvents(lost)
    events(P.Frame({"ev": P.EV_STDOUT, "re": 1, "text": "before the crash"}, []))
    events.finish({})  # no done: the agent died; the caller set status and error
    assert lost.stdout == "before the crash" and lost.status == "error"
