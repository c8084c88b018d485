"""Data out without the row limit: ``fetch NAME --to FILE`` streams a whole table, batch by batch, into a
local parquet, CSV or Arrow file with the types a reader expects, and never leaves a partial file under
the target's name; ``dhvm fetch`` does it from the shell and ``dhvm exec -i NAME=FILE`` sends a local
file in as a table. Real Deephaven servers (local backend) and, marked qemu, a real microVM."""

from __future__ import annotations

import datetime as dt
import decimal
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest
from IPython.utils.capture import capture_output

from dhg_kernel.errors import AgentRefused, TableFileError, UsageError
from test_inputs import _every_type
from test_types import ALL_TYPES

pytestmark = pytest.mark.slow

BIG = """
from deephaven import empty_table, agg
big = empty_table(1_000_000).update(["I = i", "D = i * 1.5", "S = `s` + (i % 1000)",
                                     "T = '2024-01-01T00:00:00Z' + 'PT1s' * i"])
sums = big.agg_by([agg.sum_("SI = I"), agg.sum_("SD = D"), agg.count_("N")])
"""


@pytest.fixture(params=["local", pytest.param("qemu", marks=pytest.mark.qemu)])
def server(request):
    """A session with a live server: the shared local one, or a freshly restored QEMU microVM."""
    return request.getfixturevalue("session" if request.param == "local" else "vm")


def _read(path, fmt: str) -> pa.Table:
    if fmt == "parquet":
        return pq.read_table(path)
    if fmt == "csv":
        return pcsv.read_csv(path)
    return pa.ipc.open_file(pa.OSFile(str(path))).read_all()


def _leftovers(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_fetch_to_parquet_writes_a_million_rows_with_deephavens_values_in_few_row_groups(server, tmp_path):
    r = server.execute(BIG, max_rows=5)
    assert r.ok, r.error
    sums = r.table("sums").df
    written = server.fetch_to("big", tmp_path / "big.parquet")
    assert (written.rows, written.columns, written.format) == (1_000_000, 4, "parquet")
    assert written.bytes == (tmp_path / "big.parquet").stat().st_size > 1_000_000
    assert "1,000,000 rows x 4 columns" in str(written) and str(tmp_path / "big.parquet") in str(written)
    meta = pq.ParquetFile(tmp_path / "big.parquet").metadata
    assert meta.num_rows == 1_000_000
    assert meta.num_row_groups <= 2, f"{meta.num_row_groups} row groups: batches were not buffered into row groups"
    t = pq.read_table(tmp_path / "big.parquet")
    assert t.schema.names == ["I", "D", "S", "T"]
    assert t.schema.field("T").type == pa.timestamp("ns", tz="UTC")
    assert all(not f.metadata for f in t.schema), "Deephaven's field metadata is not carried into the file"
    assert pc.sum(t["I"]).as_py() == sums["SI"][0]
    assert pc.sum(t["D"]).as_py() == pytest.approx(sums["SD"][0])
    assert t["S"][999_999].as_py() == "s999" and t["I"][123_456].as_py() == 123_456
    assert t["T"][86_400].as_py() == pd.Timestamp("2024-01-02T00:00:00Z")
    assert _leftovers(tmp_path) == ["big.parquet"], "no temporary file is left beside it"
    server.execute("del big, sums")  # the shared server's heap is small


@pytest.mark.parametrize("fmt", ["csv", "arrow", "feather"])
def test_csv_arrow_and_feather_files_hold_the_same_table(session, tmp_path, fmt):
    r = session.execute("from deephaven import empty_table\n"
                        "mixed = empty_table(150_000).update(['I = i', 'C = (char)(65 + i % 26)', 'X = i / 4.0',\n"
                        "    'Txt = i % 3 == 0 ? null : `t` + i', \"T = '2024-03-01T12:00:00Z' + 'PT0.001s' * i\"])",
                        max_rows=0)
    assert r.ok, r.error
    path = tmp_path / f"mixed.{fmt}"
    written = session.fetch_to("mixed", path)
    assert written.rows == 150_000 and written.format == ("arrow" if fmt == "feather" else fmt)
    # (pandas reads CSV's empty fields as missing, as the file means them)
    t = pd.read_feather(path) if fmt == "feather" else pd.read_csv(path) if fmt == "csv" else _read(path, fmt).to_pandas()
    assert len(t) == 150_000 and list(t.columns) == ["I", "C", "X", "Txt", "T"]
    assert t["I"].tolist()[:3] == [0, 1, 2] and t["I"].iloc[-1] == 149_999
    assert t["C"].tolist()[:3] == ["A", "B", "C"] and t["C"].iloc[27] == "B", "char is a one-character string"
    assert t["X"].iloc[3] == 0.75
    assert pd.isna(t["Txt"].iloc[0]) and t["Txt"].iloc[1] == "t1"
    assert pd.Timestamp(t["T"].iloc[1001]) == pd.Timestamp("2024-03-01T12:00:01.001Z")


@pytest.mark.parametrize("fmt", ["parquet", "arrow"])
def test_every_input_dtype_round_trips_dataframe_to_deephaven_to_file(server, tmp_path, fmt):
    from dhg_kernel.files import CellInput

    df = _every_type()
    r = server.execute("back = df", inputs=[CellInput.of("df", "df", df)], max_rows=0)
    assert r.ok, r.error
    server.fetch_to("back", tmp_path / f"back.{fmt}")
    t = _read(tmp_path / f"back.{fmt}", fmt)
    types = {f.name: f.type for f in t.schema}
    assert types["i8"] == pa.int8() and types["i16"] == pa.int16() and types["i32"] == pa.int32()
    assert types["i64"] == pa.int64() and types["f32"] == pa.float32() and types["f64"] == pa.float64()
    assert types["flag"] == pa.bool_() and types["text"] == pa.string() and types["day"] == pa.date32()
    assert types["when"] == pa.timestamp("ns", tz="UTC") and pa.types.is_decimal(types["money"])
    sent = pa.Table.from_pandas(df, preserve_index=False)  # NaN was sent as null, and comes back so
    for name in df.columns:
        assert t[name].to_pylist() == sent[name].to_pylist(), name
    back = pd.read_parquet(tmp_path / "back.parquet", dtype_backend="numpy_nullable") if fmt == "parquet" else None
    if back is not None:
        for col in ("i8", "i16", "i32", "i64", "flag"):
            pd.testing.assert_series_equal(back[col], df[col], obj=col)
        assert back["when"][0] == df["when"][0] and back["when"][2].nanosecond == 1


def test_every_deephaven_type_goes_to_parquet_and_csv_as_readers_expect(session, tmp_path):
    r = session.execute(ALL_TYPES, max_rows=0)
    assert r.ok, r.error
    session.fetch_to("t", tmp_path / "t.parquet")
    t = pq.read_table(tmp_path / "t.parquet")
    col = {name: t[name].to_pylist() for name in t.schema.names}
    assert col["C"] == ["A", None, "C"] and t.schema.field("C").type == pa.string()
    assert col["BD"] == [decimal.Decimal("-12.345"), None, decimal.Decimal("-12.343")]
    assert t.schema.field("BD").type == pa.decimal128(38, 3)
    assert col["BI"] == [decimal.Decimal(-(2**70)), decimal.Decimal(-2 * 2**70), decimal.Decimal(-3 * 2**70)]
    assert col["LD"] == [dt.date(2024, 1, 1), dt.date(2024, 1, 2), dt.date(2024, 1, 3)]
    assert col["LT"][1] == dt.time(10, 1) and col["Arr"][2] == [2, 3] and col["Strs"][1] == ["a", "b1"]
    assert col["Inst"][1] == pd.Timestamp("2024-03-01T12:00:01Z") and col["Bo"] == [True, False, None]
    assert col["B"] == [-1, None, 1] and col["I"] == [0, 1, None]

    session.fetch_to("t", tmp_path / "t.csv")
    c = pd.read_csv(tmp_path / "t.csv", dtype=str, keep_default_na=False)
    assert c["C"].tolist() == ["A", "", "C"]
    assert c["BD"].tolist() == ["-12.345", "", "-12.343"], "decimals keep every digit"
    assert c["BI"][0] == str(-(2**70)), "big integers keep every digit"
    assert json.loads(c["Arr"][2]) == [2, 3] and json.loads(c["Strs"][1]) == ["a", "b1"], "arrays as JSON"
    assert pd.Timestamp(c["Inst"][1]) == pd.Timestamp("2024-03-01T12:00:01Z") and c["LD"][2] == "2024-01-03"


def test_an_existing_file_is_refused_without_force_and_replaced_with_it(session, tmp_path):
    r = session.execute("from deephaven import empty_table\nfive = empty_table(5).update('X = i * 2')", max_rows=0)
    assert r.ok, r.error
    target = tmp_path / "five.csv"
    target.write_text("precious\n")
    with pytest.raises(UsageError) as e:
        session.fetch_to("five", target)
    assert str(target) in str(e.value) and "add --force" in str(e.value)
    assert target.read_text() == "precious\n"
    written = session.fetch_to("five", target, force=True)
    assert written.rows == 5 and pd.read_csv(target)["X"].tolist() == [0, 2, 4, 6, 8]
    assert _leftovers(tmp_path) == ["five.csv"]


def test_format_comes_from_the_name_or_from_format(session, tmp_path):
    r = session.execute("from deephaven import empty_table\nthree = empty_table(3).update('X = i')", max_rows=0)
    assert r.ok, r.error
    with pytest.raises(UsageError, match=r"cannot tell the file's format from '\.txt'.*--format"):
        session.fetch_to("three", tmp_path / "three.txt")
    session.fetch_to("three", tmp_path / "three.txt", fmt="parquet")
    assert pq.read_table(tmp_path / "three.txt")["X"].to_pylist() == [0, 1, 2]
    with pytest.raises(UsageError, match="does not exist"):
        session.fetch_to("three", tmp_path / "no" / "such" / "dir.parquet")


def test_a_failed_fetch_leaves_no_file_and_no_temporary_file(server, tmp_path):
    r = server.execute("from deephaven import empty_table\nnot_a_table = 42\nno_cols = empty_table(4)", max_rows=0)
    assert r.ok, r.error
    with pytest.raises(AgentRefused, match="no Deephaven table named 'not_a_table'"):
        server.fetch_to("not_a_table", tmp_path / "x.parquet")
    with pytest.raises(TableFileError, match="no columns"):
        server.fetch_to("no_cols", tmp_path / "y.arrow")
    (tmp_path / "kept.csv").write_text("old\n")
    with pytest.raises(AgentRefused):
        server.fetch_to("nothing_here", tmp_path / "kept.csv", force=True)
    assert (tmp_path / "kept.csv").read_text() == "old\n", "a failed --force leaves the old file as it was"
    assert _leftovers(tmp_path) == ["kept.csv"]


def test_a_write_error_midway_stops_the_stream_and_the_server_carries_on(session, tmp_path):
    """The first batch fixes a BigDecimal column's scale; a later value with more decimal places cannot be
    written: the fetch says how to fix it, is cancelled in the server, and leaves nothing behind."""
    r = session.execute("from deephaven import empty_table\n"
                        "scales = empty_table(400_000).update('BD = i < 300_000 ? java.math.BigDecimal.valueOf(i, 1)"
                        " : java.math.BigDecimal.valueOf(i, 5)')", max_rows=0)
    assert r.ok, r.error
    instance = session.instance.id
    with pytest.raises(TableFileError, match=r"setScale\(5"):
        session.fetch_to("scales", tmp_path / "scales.arrow")
    assert _leftovers(tmp_path) == []
    t0 = time.perf_counter()
    assert session.execute("after = 1").ok
    assert time.perf_counter() - t0 < 5 and session.instance.id == instance, "the same server answers at once"
    # CSV keeps every digit, so the same table goes there.
    assert session.fetch_to("scales", tmp_path / "scales.csv").rows == 400_000
    session.execute("del scales")


def _interrupt_when(ready, fetch) -> None:
    """Run ``fetch()`` and send this process a SIGINT once ``ready()`` holds; the interrupt must come out of
    the fetch as a KeyboardInterrupt (a SIGINT after the fetch is ignored, and fails the test)."""
    armed = threading.Event()

    def on_sigint(signum, frame):  # only while the fetch runs: a late signal must not hit pytest
        if armed.is_set():
            armed.clear()
            raise KeyboardInterrupt

    def watch():
        deadline = time.monotonic() + 120
        while armed.is_set() and time.monotonic() < deadline:
            if ready():
                os.kill(os.getpid(), signal.SIGINT)
                return
            time.sleep(0.002)

    old = signal.signal(signal.SIGINT, on_sigint)
    try:
        armed.set()
        threading.Thread(target=watch, daemon=True).start()
        with pytest.raises(KeyboardInterrupt):
            fetch()
    finally:
        armed.clear()
        signal.signal(signal.SIGINT, old)


def _parts(directory) -> list:
    return [p for p in directory.iterdir() if p.name.endswith(".part")]


def test_ctrl_c_while_the_server_streams_cancels_the_fetch_and_leaves_nothing(session, tmp_path):
    r = session.execute("from deephaven import empty_table\n"
                        "streamed = empty_table(1_000_000).update(['I = i', 'D = i * 0.5', 'S = `s` + (i % 777)'])",
                        max_rows=0)
    assert r.ok, r.error
    session.fetch_to("streamed", tmp_path / "warm.arrow")  # warm: the server converts it well within a cancel's grace
    (tmp_path / "warm.arrow").unlink()
    instance = session.instance.id
    seen: list[float] = []

    def schema_arrived():  # the temporary file appears with the table's schema; batches follow
        if _parts(tmp_path):
            seen.append(time.monotonic())
        return bool(seen) and time.monotonic() - seen[0] > 0.05

    _interrupt_when(schema_arrived, lambda: session.fetch_to("streamed", tmp_path / "streamed.parquet"))
    assert _leftovers(tmp_path) == []
    assert session.execute("del streamed").ok and session.instance.id == instance, "the server was kept"


def test_a_cancel_between_batches_never_cuts_a_frame_and_the_server_stays(session):
    """A cancel stops a streamed fetch between two batches (never inside a send, which once left half
    a frame on the wire: "bad frame magic"), within one slice, and the connection goes on."""
    from dhg_kernel import protocol as P

    r = session.execute("from deephaven import empty_table\n"
                        "sliced = empty_table(2_000_000).update(['I = i', 'D = i * 0.5'])", max_rows=0)
    assert r.ok, r.error
    instance = session.instance.id
    client = session.client
    for attempt in range(5):
        rid = client.new_id()
        batches: list = []

        def on_frame(frame):
            if frame.header.get("ev") == P.EV_BATCH:
                batches.append(frame.header["seq"])
                if len(batches) == 1 + attempt:
                    client.stop(rid)

        done = client.request({"op": P.OP_FETCH, "name": "sliced", "stream": True}, (), on_frame, rid=rid,
                              grace=30)
        assert done["status"] == "error", done  # stopped: a KeyboardInterrupt error, then done
        assert batches == list(range(len(batches))) and len(batches) < 40, batches
    assert session.execute("print(sliced.size)").stdout.strip() == "2000000"
    assert session.instance.id == instance and client.dead is None
    assert session.execute("del sliced").ok


def test_ctrl_c_while_the_host_writes_the_file_leaves_nothing(session, tmp_path, monkeypatch):
    """The stream is in and the host is still writing CSV (the slowest format) when Ctrl-C comes."""
    from dhg_kernel.tablefiles import TableFileWriter

    r = session.execute("from deephaven import empty_table\n"
                        "slow_csv = empty_table(1_500_000).update(['I = i', 'D = i * 0.5', 'S = `s` + (i % 777)'])",
                        max_rows=0)
    assert r.ok, r.error
    instance = session.instance.id
    stream_done = threading.Event()
    finish = TableFileWriter.finish

    def finish_seen(self, rows=None):  # the real finish: called once the server's done has arrived
        stream_done.set()
        return finish(self, rows)

    monkeypatch.setattr(TableFileWriter, "finish", finish_seen)
    _interrupt_when(stream_done.is_set, lambda: session.fetch_to("slow_csv", tmp_path / "slow.csv"))
    assert _leftovers(tmp_path) == []
    assert session.execute("del slow_csv").ok and session.instance.id == instance


def test_fetch_to_is_refused_in_per_cell_mode(dhg_home, tmp_path):
    from dhg_kernel.session import Session

    s = Session("local", dhg_home, mode="per-cell", pool_size=0)
    with pytest.raises(UsageError, match="per-cell"):
        s.fetch_to("t", tmp_path / "t.parquet")
    assert not s.running


# -- the magic ----------------------------------------------------------------------------------------


def _cell(ip, src):
    with capture_output() as cap:
        res = ip.run_cell(src)
    return res, cap


def test_magic_fetch_to_writes_the_whole_table_with_a_progress_bar_and_refuses_to_overwrite(ip, tmp_path):
    res, cap = _cell(ip, "%%dhvm -q\nfrom deephaven import empty_table\n"
                         "mbig = empty_table(250_000).update(['X = i', 'C = (char)(97 + i % 3)'])")
    assert res.success, cap.stdout
    target = tmp_path / "mbig.parquet"
    res, cap = _cell(ip, f"%dhvm fetch mbig --to {target}")
    assert res.success, cap.stdout
    assert "250,000 rows x 2 columns" in repr(res.result) and res.result.path == target
    assert "mbig -> mbig.parquet" in cap.stderr and "rows" in cap.stderr, "a progress bar for a big table"
    t = pq.read_table(target)
    assert t.num_rows == 250_000 and t["C"][:4].to_pylist() == ["a", "b", "c", "a"]

    res, cap = _cell(ip, f"%dhvm fetch mbig --to {target}")
    assert not res.success and "UsageError" in cap.stdout and "add --force" in cap.stdout and str(target) in cap.stdout
    assert "Traceback" not in cap.stdout
    res, cap = _cell(ip, f"%dhvm fetch mbig --to {tmp_path / 'out.bin'} --format csv --force -q")
    assert res.success and cap.stderr == "", "-q: no progress bar"
    assert len(pd.read_csv(tmp_path / "out.bin")) == 250_000

    res, _ = _cell(ip, "%dhvm fetch mbig")
    assert isinstance(res.result, pd.DataFrame) and len(res.result) == 1000, "without --to: the first max_rows rows"
    res, cap = _cell(ip, "%dhvm fetch mbig --bogus")
    assert not res.success and "usage: %dhvm fetch NAME" in cap.stdout
    res, cap = _cell(ip, "%dhvm fetch mbig --force")
    assert not res.success and "go with --to FILE" in cap.stdout
    res, cap = _cell(ip, f"%dhvm fetch mbig --to '{tmp_path / 'my data.arrow'}' -q")
    assert res.success, cap.stdout  # a quoted path may hold spaces
    res, cap = _cell(ip, f"%dhvm fetch mbig --to '{tmp_path / 'unclosed.arrow'}")
    assert not res.success and "close the quote" in cap.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mbig.parquet", "my data.arrow", "out.bin"]


# -- the command line ----------------------------------------------------------------------------------


def dhvm(*args, cwd, env_home, backend="local"):
    env = {**os.environ, "DHG_HOME": str(env_home)}
    return subprocess.run([sys.executable, "-m", "dhg_kernel.cli", *args, "--backend", backend], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture
def files_in(workspace):
    """The workspace with a parquet and a CSV file to send in with -i."""
    pd.DataFrame({"sym": ["A", "B", "A", "C"], "qty": [1, 2, 3, 4]}).to_parquet(workspace / "data" / "trades.parquet")
    (workspace / "data" / "px.csv").write_text("sym,px\nA,1.5\nB,2.5\n")
    return workspace


def test_dhvm_fetch_runs_the_script_then_writes_the_table(files_in, dhg_home):
    (files_in / "job.py").write_text("print('in', trades.size, px.size)\n"
                                     "joined = trades.natural_join(px, 'sym').update('v = qty * px')\n")
    (files_in / "out").mkdir()
    p = dhvm("fetch", "joined", "--to", "out/joined.parquet", "job.py", "-i", "trades=data/trades.parquet",
             "-i", "px=data/px.csv", cwd=files_in, env_home=dhg_home)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("in 4 2\n") and "dhvm: wrote joined: 4 rows x 4 columns" in p.stdout
    t = pq.read_table(files_in / "out" / "joined.parquet").to_pandas()
    assert t["sym"].tolist() == ["A", "B", "A", "C"] and t["v"].tolist()[:3] == [1.5, 5.0, 4.5] and pd.isna(t["v"][3])

    # Refused before any server starts: the file exists, or its format is unknown.
    t0 = time.perf_counter()
    p = dhvm("fetch", "joined", "--to", "out/joined.parquet", "job.py", cwd=files_in, env_home=dhg_home)
    assert p.returncode == 2 and "already exists; add --force" in p.stderr
    p = dhvm("fetch", "joined", "--to", "out/joined.xlsx", "job.py", cwd=files_in, env_home=dhg_home)
    assert p.returncode == 2 and "cannot tell the file's format" in p.stderr
    assert time.perf_counter() - t0 < 20


def test_dhvm_fetch_writes_nothing_when_the_script_fails_or_the_table_is_missing(files_in, dhg_home):
    p = dhvm("fetch", "t", "--to", "t.csv", "-c", "raise RuntimeError('no table today')", cwd=files_in,
             env_home=dhg_home)
    assert p.returncode == 1 and "RuntimeError: no table today" in p.stderr
    p = dhvm("fetch", "t", "--to", "t.csv", "-c", "t = 7", cwd=files_in, env_home=dhg_home)
    assert p.returncode == 2 and "no Deephaven table named 't'" in p.stderr
    assert sorted(x.name for x in files_in.iterdir()) == ["data"]


def test_dhvm_exec_i_sends_local_files_as_tables(files_in, dhg_home):
    p = dhvm("exec", "--json", "-i", "trades=data/trades.parquet", "-i", "px=data/px.csv", "-c",
             "big = trades.where('qty > 1')\nprint(px.meta_table.size)", cwd=files_in, env_home=dhg_home)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["stdout"] == "2\n"
    (big,) = out["tables"]
    assert big["name"] == "big" and [r["qty"] for r in big["data"]] == [2, 3, 4]


def test_dhvm_exec_i_refuses_bad_inputs_before_running(files_in, dhg_home):
    (files_in / "data" / "broken.parquet").write_text("not parquet")
    cases = [(["-i", "trades=data/nope.parquet"], "there is no file data/nope.parquet"),
             (["-i", "trades=data/trades.xlsx"], "cannot tell the file's format from '.xlsx'"),
             (["-i", "data/trades.parquet"], "write -i NAME=FILE"),
             (["-i", "1st=data/trades.parquet"], "write -i NAME=FILE"),
             (["-i", "b=data/broken.parquet"], "could not read data/broken.parquet as parquet"),
             (["-i", "trades=data/trades.parquet", "--max-push-mb", "0.0001"], "over the 0.0001 MiB push limit")]
    for extra, said in cases:
        p = dhvm("exec", *extra, "-c", "x = 1", cwd=files_in, env_home=dhg_home)
        assert p.returncode == 2 and said in p.stderr, (extra, p.stderr)
    assert "-i trades=data/trades.parquet" in p.stderr, "the limit's message lists the input"


@pytest.mark.qemu
def test_dhvm_fetch_from_a_microvm(files_in, qemu_home):
    p = dhvm("fetch", "big", "--to", "big.arrow", "-i", "trades=data/trades.parquet", "-c",
             "from deephaven import empty_table\nn = trades.size\nbig = empty_table(200_000).update(['X = i', 'N = n'])",
             cwd=files_in, env_home=qemu_home, backend="qemu")
    assert p.returncode == 0, p.stderr
    t = pa.ipc.open_file(pa.OSFile(str(files_in / "big.arrow"))).read_all()
    assert t.num_rows == 200_000 and t["N"][0].as_py() == 4 and t["X"][199_999].as_py() == 199_999
