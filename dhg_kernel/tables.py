"""Arrow IPC from the guest to pandas, with Deephaven's types kept.

``numpy_nullable`` (the default) keeps integer and boolean columns integer and boolean even when
they hold nulls (pandas ``Int64``/``boolean``); floats stay ``float64`` with NaN; strings are
pandas strings; Deephaven ``Instant`` columns become ``datetime64[ns, UTC]``.

Deephaven names each column's Java type in the Arrow field metadata (``deephaven:type``); the
types Arrow has no word for are turned into what a Python user expects: ``char`` (sent as uint16)
into one-character strings, ``BigDecimal`` (sent as a 4-byte little-endian scale and the unscaled
value's big-endian two's-complement bytes) into ``decimal.Decimal``, ``BigInteger`` into ``int``.
``LocalDate``/``LocalTime`` become ``datetime.date``/``datetime.time`` (pandas' usual object
columns), arrays and vectors NumPy arrays.
"""

from __future__ import annotations

import decimal

import pandas as pd
import pyarrow as pa

DTYPE_BACKENDS = ("numpy_nullable", "pyarrow", "numpy")

_NULLABLE = {
    pa.int8(): pd.Int8Dtype(),
    pa.int16(): pd.Int16Dtype(),
    pa.int32(): pd.Int32Dtype(),
    pa.int64(): pd.Int64Dtype(),
    pa.uint8(): pd.UInt8Dtype(),
    pa.uint16(): pd.UInt16Dtype(),
    pa.uint32(): pd.UInt32Dtype(),
    pa.uint64(): pd.UInt64Dtype(),
    pa.bool_(): pd.BooleanDtype(),
}


def read_ipc(payload) -> pa.Table:
    """Decode one Arrow IPC stream (zero-copy over the received buffer)."""
    with pa.ipc.open_stream(pa.py_buffer(payload)) as reader:
        return reader.read_all()


def to_ipc(value) -> bytes:
    """A pandas DataFrame or pyarrow Table as one Arrow IPC stream that Deephaven's converter takes:
    a meaningful index becomes columns, categoricals are decoded, large strings/binaries narrowed."""
    if isinstance(value, pd.DataFrame):
        df = value if isinstance(value.index, pd.RangeIndex) and value.index.name is None else value.reset_index()
        table = pa.Table.from_pandas(df, preserve_index=False)
    elif isinstance(value, pa.Table):
        table = value
    else:
        raise TypeError(f"not a DataFrame or Arrow table: {type(value).__name__}")
    columns = []
    for column in table.columns:
        if pa.types.is_dictionary(column.type):
            column = pa.chunked_array([chunk.dictionary_decode() for chunk in column.chunks],
                                      type=column.type.value_type)
        if pa.types.is_large_string(column.type):
            column = column.cast(pa.string())
        elif pa.types.is_large_binary(column.type):
            column = column.cast(pa.binary())
        columns.append(column)
    table = pa.Table.from_arrays(columns, names=table.column_names)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def deephaven_type(field: pa.Field) -> str | None:
    """The Java type Deephaven gave a column (``char``, ``java.math.BigDecimal``…), if it said."""
    value = (field.metadata or {}).get(b"deephaven:type")
    return value.decode() if value is not None else None


def _chars(column: pa.ChunkedArray) -> pa.Array:
    """uint16 char codes -> one-character strings (UTF-32 code units viewed as NumPy U1), nulls kept."""
    codes = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    text = codes.fill_null(0).to_numpy(zero_copy_only=False).astype("<u4").view("<U1")
    return pa.array(text, type=pa.string(), mask=codes.is_null().to_numpy(zero_copy_only=False))


def _big_decimal(raw: bytes | None):
    if raw is None:
        return None
    scale = int.from_bytes(raw[:4], "little", signed=True)
    return decimal.Decimal(int.from_bytes(raw[4:], "big", signed=True)).scaleb(-scale)


def _big_integer(raw: bytes | None):
    return None if raw is None else int.from_bytes(raw, "big", signed=True)


_PYTHON_VALUES = {"java.math.BigDecimal": _big_decimal, "java.math.BigInteger": _big_integer}


def to_pandas(table: pa.Table, dtype_backend: str = "numpy_nullable", rows: int | None = None) -> pd.DataFrame:
    """Convert an Arrow table to a DataFrame with the chosen dtype backend.

    ``rows``: the table's row count, for a table with no columns (Arrow then has no rows to count).
    """
    if dtype_backend not in DTYPE_BACKENDS:
        raise ValueError(f"unknown dtype_backend {dtype_backend!r}; choose one of {', '.join(DTYPE_BACKENDS)}")
    if table.num_columns == 0:
        return pd.DataFrame(index=pd.RangeIndex(table.num_rows if rows is None else rows))
    later: dict[str, object] = {}
    for i, field in enumerate(table.schema):
        jtype = deephaven_type(field)
        if jtype == "char" and pa.types.is_integer(field.type):
            table = table.set_column(i, field.with_type(pa.string()), _chars(table.column(i)))
        elif jtype in _PYTHON_VALUES and pa.types.is_binary(field.type):
            later[field.name] = _PYTHON_VALUES[jtype]
    if dtype_backend == "numpy_nullable":
        df = table.to_pandas(types_mapper=_NULLABLE.get)
        for i, field in enumerate(table.schema):
            if pa.types.is_string(field.type) and deephaven_type(field) == "char":
                df[field.name] = df[field.name].astype(pd.StringDtype())
    elif dtype_backend == "pyarrow":
        df = table.to_pandas(types_mapper=pd.ArrowDtype)
    else:
        df = table.to_pandas()
    for name, convert in later.items():
        df[name] = pd.Series([convert(v) for v in table.column(name).to_pylist()], index=df.index, dtype=object)
    return df
