"""Every Deephaven column type arrives as the pandas type a Python user expects (real server)."""

from __future__ import annotations

import datetime as dt
import decimal

import numpy as np
import pandas as pd
import pytest

pytestmark = pytest.mark.slow

ALL_TYPES = """
from deephaven import empty_table
t = empty_table(3).update([
    "B = i == 1 ? NULL_BYTE : (byte)(i - 1)", "S = (short)(-i)", "I = i == 2 ? NULL_INT : i", "L = (long)i * 10000000000L",
    "F = (float)(i / 2.0)", "D = i == 1 ? NULL_DOUBLE : i * 1.5", "Bo = i == 2 ? null : i % 2 == 0",
    "C = i == 1 ? NULL_CHAR : (char)('A' + i)", "Str = i == 1 ? null : `s` + i",
    "Inst = '2024-03-01T12:00:00Z' + 'PT1s' * i", "LD = java.time.LocalDate.of(2024, 1, 1 + i)",
    "LT = java.time.LocalTime.of(10, i)", "BD = i == 1 ? null : java.math.BigDecimal.valueOf(-12345 + i, 3)",
    "BI = java.math.BigInteger.valueOf(-1 - i).shiftLeft(70)", "Arr = new int[]{i, i + 1}",
    "Strs = new String[]{`a`, `b` + i}"])
"""


@pytest.fixture(scope="module")
def all_types(session):
    r = session.execute(ALL_TYPES)
    assert r.ok, r.error
    return r.tables[0]


def test_every_column_type_maps_to_what_pandas_users_expect(all_types):
    df = all_types.df
    assert df["B"].dtype == "Int8" and df["B"].isna().tolist() == [False, True, False]
    assert df["S"].dtype == "Int16" and df["S"].tolist() == [0, -1, -2]
    assert df["I"].dtype == "Int32" and pd.isna(df["I"][2])
    assert df["L"].dtype == "Int64" and df["L"][2] == 20_000_000_000
    assert df["F"].dtype == "float32" and df["D"].dtype == "float64" and np.isnan(df["D"][1])
    assert df["Bo"].dtype == "boolean" and df["Bo"].tolist()[:2] == [True, False] and pd.isna(df["Bo"][2])
    # char: one-character strings, nulls kept (was 65/<NA>/67)
    assert isinstance(df["C"].dtype, pd.StringDtype)
    assert df["C"][0] == "A" and pd.isna(df["C"][1]) and df["C"][2] == "C"
    assert pd.api.types.is_string_dtype(df["Str"]) and df["Str"][0] == "s0" and pd.isna(df["Str"][1])
    assert str(df["Inst"].dtype) == "datetime64[ns, UTC]"
    assert df["Inst"][1] == pd.Timestamp("2024-03-01T12:00:01Z")
    assert df["LD"][2] == dt.date(2024, 1, 3) and df["LT"][1] == dt.time(10, 1)
    assert df["BD"][0] == decimal.Decimal("-12.345") and df["BD"][2] == decimal.Decimal("-12.343") and df["BD"][1] is None
    assert df["BI"][1] == -2 * 2**70 and isinstance(df["BI"][1], int)
    assert list(df["Arr"][2]) == [2, 3] and list(df["Strs"][1]) == ["a", "b1"]


@pytest.mark.parametrize("backend", ["pyarrow", "numpy"])
def test_char_columns_are_strings_with_every_dtype_backend(all_types, backend):
    from dhg_kernel.tables import to_pandas

    col = to_pandas(all_types.arrow, backend)["C"]
    assert col[0] == "A" and col[2] == "C" and pd.isna(col[1])


def test_tables_with_no_rows_or_no_columns(session):
    r = session.execute("from deephaven import empty_table\n"
                        "no_rows = empty_table(0).update(['C = (char)65', 'BD = java.math.BigDecimal.ONE', 'X = i'])\n"
                        "no_cols = empty_table(4)")
    assert r.ok, r.error
    no_rows, no_cols = r.table("no_rows").df, r.table("no_cols").df
    assert len(no_rows) == 0 and list(no_rows.columns) == ["C", "BD", "X"] and no_rows["X"].dtype == "Int32"
    assert isinstance(no_rows["C"].dtype, pd.StringDtype)
    assert no_cols.shape == (4, 0)


def test_a_deephaven_query_error_shows_its_summary_first(session):
    """The useful line used to be line 43 of 129: now the message, the expression and the cell line lead."""
    r = session.execute("from deephaven import empty_table\nx = 1\nt = empty_table(3).update('Y = nosuch + 1')")
    e = r.error
    assert e.name == "DHError"
    assert e.summary[0] == "DHError: table update operation failed: Cannot find variable or class nosuch"
    assert e.summary[1] == "  in the expression: nosuch + 1"
    assert e.summary[2] == "  at cell line 3: t = empty_table(3).update('Y = nosuch + 1')"
    assert e.value == "table update operation failed: Cannot find variable or class nosuch"
    assert any("QueryLanguageParser" in line for line in e.traceback), "the full trace is still there"
    from dhg_kernel.display import remote_error

    shown = remote_error(e)._render_traceback_()
    assert "Cannot find variable or class nosuch" in shown[1] and "nosuch + 1" in shown[2]
    # A short Python error gets no summary: its traceback is short already.
    assert session.execute("1 / 0").error.summary == []


@pytest.mark.parametrize("code", ["t.update(", "t.update(['X = 1', ", "t.update(\n    ['X = 1',\n    "])
def test_shift_tab_inside_a_call_shows_the_callees_signature(session, code):
    session.execute("from deephaven import empty_table\nt = empty_table(1)")
    reply = session.inspect(code, len(code))
    text = reply["data"].get("text/plain", "")
    assert reply["found"] and "Signature: t.update(formulas" in text, text[:300]


def test_callee_at_finds_the_open_call_only():
    from dhg_kernel.guest.introspect import _callee_at

    assert _callee_at("print(len(x), ", 14) == "print"
    assert _callee_at("f(g(1), h(", 10) == "h"
    assert _callee_at("x = [1, 2", 9) == ""
    assert _callee_at("f(1)\ny = ", 9) == ""
