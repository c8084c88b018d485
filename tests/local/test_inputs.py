"""`%%dhvm -i NAME`: notebook DataFrames and Arrow tables go into the VM as Deephaven tables (Arrow IPC
payloads on the same protocol, no CSV, no base64), JSON-able values as themselves; dtypes survive the
round trip DataFrame -> Deephaven -> DataFrame. Real Deephaven servers (local backend) and, marked
qemu, a real microVM."""

from __future__ import annotations

import datetime
import decimal

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from IPython.utils.capture import capture_output

pytestmark = pytest.mark.slow


def run(ip, src):
    with capture_output() as cap:
        res = ip.run_cell(src)
    return res, cap


def _every_type() -> pd.DataFrame:
    """One column per dtype the result tables come back as (docs/data.md, "Tables and dtypes")."""
    return pd.DataFrame({
        "i8": pd.array([1, None, -3], dtype="Int8"),
        "i16": pd.array([300, None, -3], dtype="Int16"),
        "i32": pd.array([70000, None, -3], dtype="Int32"),
        "i64": pd.array([2**40, None, -3], dtype="Int64"),
        "f32": np.array([1.5, np.nan, -3.25], dtype="float32"),
        "f64": [1.25, np.nan, 1e300],
        "flag": pd.array([True, None, False], dtype="boolean"),
        "text": pd.array(["a", None, "ünï"], dtype="string"),
        "when": pd.to_datetime(["2024-03-01T14:30:00.123456789Z", None, "1999-12-31T23:59:59.000000001Z"], utc=True),
        "day": [datetime.date(2024, 3, 1), None, datetime.date(1970, 1, 1)],
        "money": [decimal.Decimal("12.345"), None, decimal.Decimal("-0.001")],
    })


def test_every_type_survives_the_round_trip_into_deephaven_and_back(ip):
    df = _every_type()
    ip.user_ns["df"] = df
    res, cap = run(ip, "%%dhvm -i df -o back=df\nprint(df.size, [c.data_type for c in df.columns][:2])")
    assert res.success, cap.stdout + cap.stderr
    assert "3 " in cap.stdout
    back = ip.user_ns["back"]
    assert list(back.columns) == list(df.columns)
    for col in ("i8", "i16", "i32", "i64", "f32", "f64", "flag", "when"):
        assert back[col].dtype == df[col].dtype, (col, back[col].dtype, df[col].dtype)
        pd.testing.assert_series_equal(back[col], df[col], check_names=True, obj=col)
    # Strings come back as pandas' default string dtype (missing values as its NA), whatever went in.
    assert pd.api.types.is_string_dtype(back["text"]) and back["text"][0] == "a" and back["text"][2] == "ünï"
    assert pd.isna(back["text"][1])
    assert back["day"].tolist() == df["day"].tolist()
    assert back["money"].tolist()[0] == decimal.Decimal("12.345") and pd.isna(back["money"][1])
    assert back["money"].tolist()[2] == decimal.Decimal("-0.001")


def test_the_table_is_a_deephaven_table_in_the_cell_renamed_and_json_values_stay_themselves(ip):
    ip.user_ns["trades"] = pd.DataFrame({"sym": ["A", "B", "A"], "qty": [1, 2, 3]})
    ip.user_ns["arrow_t"] = pa.table({"x": [1.5, 2.5]})
    ip.user_ns["params"] = {"min_qty": 2, "syms": ["A", "B"], "label": "q"}
    res, cap = run(ip, "%%dhvm -i trades=t -i arrow_t -i params\n"
                       "from deephaven.table import Table\n"
                       "print(isinstance(t, Table), isinstance(arrow_t, Table), type(params).__name__)\n"
                       "big = t.where(f\"qty >= {params['min_qty']}\")")
    assert res.success, cap.stdout
    assert cap.stdout.splitlines()[0] == "True True dict"
    result = ip.user_ns["_dhvm"]
    assert [t.name for t in result.tables] == ["big"], "inputs are not echoed back as results"
    assert result.tables[0].df["qty"].tolist() == [2, 3]


def test_bad_inputs_are_refused_before_the_cell_runs_with_what_to_do(ip):
    ip.user_ns["handle"] = open  # not JSON-able
    res, cap = run(ip, "%%dhvm -i handle\nran = 1")
    assert not res.success and "neither a DataFrame/Arrow table nor JSON-able" in cap.stdout
    res, cap = run(ip, "%%dhvm -i nothere\nran = 1")
    assert not res.success and "no variable 'nothere'" in cap.stdout
    res, cap = run(ip, "%%dhvm -i 1bad\nran = 1")
    assert not res.success and "not a valid Python name" in cap.stdout
    ip.user_ns["huge"] = pd.DataFrame({"x": np.arange(200_000, dtype="int64")})
    res, cap = run(ip, "%%dhvm -i huge --max-push-mb 0.5\nran = 1")
    assert not res.success and "push limit" in cap.stdout and "-i huge" in cap.stdout
    res, cap = run(ip, "%%dhvm\nprint('ran' in globals())")
    assert cap.stdout.strip() == "False", "no refused cell ran"


@pytest.mark.qemu
def test_a_dataframe_and_a_value_go_into_a_microvm(vm):
    """The same payloads through the session API into a restored QEMU VM: dtypes and values survive."""
    from dhg_kernel.files import CellInput

    df = _every_type()
    inputs = [CellInput.of("df", "prices", df), CellInput.of("n", "n", 2)]
    r = vm.execute("print(prices.size, n)\nhead2 = prices.head(n)", inputs=inputs, max_rows=None)
    assert r.ok, r.error
    assert r.stdout == "3 2\n"
    (t,) = r.tables
    assert t.name == "head2" and t.rows == 2
    pd.testing.assert_frame_equal(t.df[["i64", "f64", "when"]], df[["i64", "f64", "when"]].head(2))
    assert t.df["text"].tolist()[0] == "a" and pd.isna(t.df["text"][1])
