"""Big outputs and odd column names never lose work (issue 21): a print or an error over the protocol's
header limit arrives (in pieces, or clipped with a note), the kernel keeps only a bounded tail of what it
streamed, DataFrames with column names Deephaven cannot take are refused before anything is sent, and
``fetch --to`` leaves no empty stderr box. Real Deephaven servers (local backend), one real microVM."""

from __future__ import annotations

import json

import nbformat
import pandas as pd
import pyarrow as pa
import pytest
from IPython.utils.capture import capture_output

from dhg_kernel import protocol as P

pytestmark = pytest.mark.slow
NINE_MB = 9_000_000


def _streamed(session, code: str, **kw):
    """Run ``code``; the result and every piece of stdout as it was streamed."""
    pieces: list[str] = []
    return session.execute(code, on_stdout=pieces.append, **kw), pieces


# -- the protocol's part --------------------------------------------------------------------------------


def test_an_error_event_of_any_size_fits_a_frame_and_keeps_its_start_and_end():
    huge = "START" + "y" * NINE_MB + "END"
    head = P.error_event("ValueError", huge, ["Traceback (most recent call last):\n"] + ["  frame\n"] * 200_000
                         + [f"ValueError: {huge}\n"], re=1, summary=[huge, "  at cell line 1"])
    frame = P.decode_bytes(b"".join(bytes(b) for b in P.encode(head)))  # no HeaderTooLarge
    h = frame.header
    assert h["value"].startswith("START") and h["value"].endswith("END")
    assert len(h["value"]) <= P.MAX_ERROR_CHARS // 4 and f"of {len(huge):,} characters cut here" in h["value"]
    assert P.clip_lines(h["traceback"], P.MAX_ERROR_CHARS // 2) == h["traceback"], "clipped once, not again"
    assert h["traceback"][0].startswith("Traceback") and h["traceback"][-1].rstrip().endswith("END")
    assert any("lines cut here" in line for line in h["traceback"]), "the middle frames go, with a note"
    assert sum(map(len, h["traceback"])) + len(h["value"]) + sum(map(len, h["summary"])) <= P.MAX_ERROR_CHARS
    small = P.error_event("E", "short", ["a\n", "b\n"])
    assert small["value"] == "short" and small["traceback"] == ["a\n", "b\n"], "small errors are untouched"


def test_text_pieces_stay_under_the_header_limit_for_the_worst_characters():
    # An astral character is 12 bytes of JSON (two \uXXXX escapes): the worst case the piece size allows for.
    text = "\U0001F600" * (P.TEXT_CHUNK_CHARS + 10)
    pieces = list(P.text_chunks(text))
    assert "".join(pieces) == text and len(pieces) == 2
    for piece in pieces:
        P.encode({"ev": P.EV_STDOUT, "re": 1, "text": piece})  # raises HeaderTooLarge if over


# -- big prints and errors (local backend) ----------------------------------------------------------------


def test_a_9_mb_print_arrives_whole_in_pieces(session):
    r, pieces = _streamed(session, f"print('x' * {NINE_MB})")
    assert r.ok, r.error
    assert "".join(pieces) == "x" * NINE_MB + "\n"
    assert len(pieces) > 1 and max(map(len, pieces)) <= P.TEXT_CHUNK_CHARS
    r, pieces = _streamed(session, "print('\\U0001F600' * 1_000_000, end='')")  # 12 MB of JSON escapes
    assert r.ok and "".join(pieces) == "\U0001F600" * 1_000_000


def test_a_200_mb_print_is_streamed_and_the_result_keeps_a_bounded_tail(session):
    from dhg_kernel.result import KEPT_OUTPUT_CHARS

    count = [0]
    tail = []

    def seen(text):
        count[0] += len(text)
        tail.append(text)
        del tail[:-2]

    r = session.execute("print('a' * 199_999_999 + 'Z')", on_stdout=seen)
    assert r.ok, r.error
    assert count[0] == 200_000_001 and "".join(tail).endswith("Z\n"), "every character reached the notebook"
    assert r.stdout_dropped == 200_000_001 - KEPT_OUTPUT_CHARS
    note, kept = r.stdout.split("\n", 1)
    assert kept == "a" * (KEPT_OUTPUT_CHARS - 2) + "Z\n", "the last characters are kept"
    assert f"the first {r.stdout_dropped:,} characters of stdout were shown as they came and not kept" in note


def test_2000_prints_of_100_kb_keep_a_bounded_tail_and_unstreamed_output_stays_whole(session):
    from dhg_kernel.result import KEPT_OUTPUT_CHARS

    code = "for n in range(2000):\n    print(str(n % 10) * 99_999)"
    r, pieces = _streamed(session, code)
    total = 2000 * 100_000
    assert r.ok and sum(map(len, pieces)) == total
    assert len(r.stdout) < KEPT_OUTPUT_CHARS + 200, "the kernel does not hold 200 MB of stdout"
    assert r.stdout_dropped == total - KEPT_OUTPUT_CHARS and r.stdout.endswith("9" * 99_999 + "\n")
    # Nobody saw it stream (dhvm exec --json, Session.execute without callbacks): all of it is the result.
    r = session.execute("for n in range(30):\n    print(str(n % 10) * 99_999)")
    assert r.ok and len(r.stdout) == 3_000_000 and r.stdout_dropped == 0
    assert json.loads(json.dumps(r.to_dict()))["stdout_dropped"] == 0


def test_a_9_mb_exception_message_is_clipped_readably_and_kept_whole_in_the_session(session):
    r = session.execute(f"def boom():\n    raise ValueError('START' + 'y' * {NINE_MB} + 'END')\nboom()")
    assert r.status == "error" and r.error.name == "ValueError", r.error
    value = r.error.value
    assert value.startswith("START") and value.endswith("END") and len(value) < P.MAX_ERROR_CHARS
    assert f"of {NINE_MB + 8:,} characters cut here" in value and "print(sys.last_value)" in value
    tb = "".join(r.error.traceback)
    assert "boom()" in tb and "raise ValueError" in tb and tb.rstrip().endswith("END"), "the traceback is readable"
    r2, pieces = _streamed(session, "import sys\nm = str(sys.last_value)\nprint(len(m), m[:5], m[-3:])")
    assert r2.ok and "".join(pieces) == f"{NINE_MB + 8} START END\n", "the whole message is still there"
    # Many lines (a Java trace's shape): the summary stays short, the traceback keeps start and end.
    r = session.execute("raise RuntimeError('first line\\n' + ''.join(f'  at frame {i}\\n' for i in range(600_000))"
                        " + 'last line')")
    assert r.error.name == "RuntimeError" and r.error.summary[0].startswith("RuntimeError: first line")
    assert "last line" in r.error.traceback[-1] and sum(map(len, r.error.traceback)) < P.MAX_ERROR_CHARS


# -- column names Deephaven cannot take (-i) --------------------------------------------------------------


def _cell(ip, src):
    with capture_output() as cap:
        res = ip.run_cell(src)
    return res, cap


def test_int_and_non_ascii_column_names_are_refused_before_the_server_with_the_rename(ip):
    ip.user_ns["df"] = pd.DataFrame({0: [1, 2], 1: [3, 4], "ü": [5, 6], "ok": [7, 8]})
    res, cap = _cell(ip, "%%dhvm -i df\nreached = True")
    assert not res.success and "UsageError" in cap.stdout and "Traceback" not in cap.stdout
    out = cap.stdout
    assert "-i df: Deephaven cannot take 3 of this DataFrame's column names" in out
    assert "0: not text but int 0" in out and "'ü': a name may hold only ASCII letters" in out and "'ok'" not in out
    fix = next(line.strip() for line in out.splitlines() if line.strip().startswith("df = df.rename("))
    assert fix == "df = df.rename(columns={0: 'column_0', 1: 'column_1', 'ü': 'u'})"
    res, cap = _cell(ip, "%%dhvm\nprint('reached' in globals())")
    assert res.success and cap.stdout.strip() == "False", "nothing reached the server"

    ip.run_cell(fix)  # the proposed rename works as given
    res, cap = _cell(ip, "%%dhvm -i df -o back -q\nback = df.update('s = column_0 + u')")
    assert res.success, cap.stdout
    assert list(ip.user_ns["back"].columns) == ["column_0", "column_1", "u", "ok", "s"]
    assert ip.user_ns["back"]["s"].tolist() == [6, 8]


def test_reserved_words_and_duplicates_in_an_arrow_table_are_refused(ip):
    ip.user_ns["tbl"] = pa.table([[1], [2], [3]], names=["in", "class", "in"])
    res, cap = _cell(ip, "%%dhvm -i tbl\npass")
    assert not res.success and "UsageError" in cap.stdout
    assert "'in': reserved in Deephaven's query language" in cap.stdout
    assert "'class': a Java keyword" in cap.stdout and "'in': appears twice" in cap.stdout
    assert "tbl = tbl.rename_columns(" in cap.stdout


JAVA_CHECK = """
import jpy
NV = jpy.get_type("io.deephaven.api.util.NameValidator")
out = {}
for n in NAMES:
    try:
        out[n] = NV.legalizeColumnName(n)
    except Exception:
        out[n] = None
print(json.dumps(out))
"""


def test_the_column_name_rules_are_deephavens_own(session):
    from dhg_kernel.tables import _JAVA_KEYWORDS, _QUERY_RESERVED, column_name_problem, legal_column_name

    names = sorted(_JAVA_KEYWORDS | _QUERY_RESERVED) + [
        "ok", "Ok_1", "$", "$x", "_x", "x$", "0", "1x", "a b", "a-b", "ü", "naïve", "Int", "IN", "var",
        "record", "yield", "sealed", "permits", "module", "String", "x.y", "column_0", "名前"]
    r = session.execute(f"import json\nNAMES = {names!r}\n{JAVA_CHECK}")
    assert r.ok, r.error
    java = json.loads(r.stdout)
    for n in names:
        ours_ok = column_name_problem(n) is None
        assert ours_ok == (java[n] == n), f"{n!r}: ours says {'legal' if ours_ok else 'illegal'}, Java made {java[n]!r}"
        if java[n] is not None and n.isascii():
            assert legal_column_name(n) == java[n], n


# -- fetch --to in a notebook: no empty stderr box ------------------------------------------------------------


def _visible(text: str) -> str:
    """A stream's text as a notebook shows it: each line from its last carriage return."""
    return "\n".join(line.rsplit("\r", 1)[-1] for line in text.split("\n"))


def test_fetch_to_in_a_notebook_leaves_no_empty_stderr_output(jupyter_path, dhg_home, tmp_path):
    from nbclient import NotebookClient

    target = tmp_path / "big.parquet"
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("from deephaven import empty_table\n"
                                          "big = empty_table(300_000).update(['X = i'])"),
                nbformat.v4.new_code_cell(f"%dhvm fetch big --to {target}")]
    NotebookClient(nb, kernel_name="dhvm", timeout=600, resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = nb.cells[1].outputs
    assert target.is_file() and pd.read_parquet(target)["X"].iloc[-1] == 299_999
    result = [o for o in outputs if o.output_type == "execute_result"]
    assert result and "dhvm: wrote big: 300,000 rows" in result[0].data["text/plain"]
    for o in outputs:
        if o.output_type == "stream":
            assert _visible(o.text).strip(), f"an empty {o.name} output: {o.text!r}"
        elif o.output_type == "display_data":
            assert not o.data.get("text/plain", "x").strip() == "", "an output showing nothing but blanks"
            assert "rows/s" not in o.data.get("text/plain", ""), "the progress bar is gone once the file is written"
    bars = [o for o in outputs if o.output_type == "display_data" and o.data == {}]
    assert len(bars) == 1, "the progress bar was shown, in one output, and emptied at the end"


# -- a real microVM ------------------------------------------------------------------------------------------


@pytest.mark.qemu
def test_a_9_mb_print_and_a_9_mb_error_in_a_microvm(vm):
    r, pieces = _streamed(vm, f"print('x' * {NINE_MB})")
    assert r.ok, r.error
    assert "".join(pieces) == "x" * NINE_MB + "\n"
    r = vm.execute(f"raise ValueError('START' + 'y' * {NINE_MB} + 'END')")
    assert r.status == "error" and r.error.name == "ValueError"
    assert r.error.value.startswith("START") and r.error.value.endswith("END") and "characters cut here" in r.error.value
    r, pieces = _streamed(vm, "import sys\nprint(len(str(sys.last_value)))")
    assert r.ok and "".join(pieces) == f"{NINE_MB + 8}\n"


def test_a_notebook_cell_printing_20_mb_leaves_only_a_bounded_tail_in_the_kernel(ip):
    from dhg_kernel.result import KEPT_OUTPUT_CHARS

    with capture_output() as cap:
        res = ip.run_cell("%%dhvm\nfor n in range(200):\n    print(str(n % 10) * 99_999)")
    assert res.success and len(cap.stdout) == 20_000_000, "all of it reached the notebook"
    kept = ip.user_ns["_dhvm"]
    assert len(kept.stdout) < KEPT_OUTPUT_CHARS + 200 and kept.stdout_dropped == 20_000_000 - KEPT_OUTPUT_CHARS
    # IPython 9 keeps a copy of every write of a cell (history_manager.outputs): not of the VM's output.
    held = sum(len(part) for outs in ip.history_manager.outputs.values() for o in outs
               for part in (o.bundle.get("stream") or []))
    assert held < KEPT_OUTPUT_CHARS, f"the kernel still holds {held:,} characters of streamed output"
