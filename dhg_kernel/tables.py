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

``PlainBatches`` makes the same conversions at the Arrow level, batch by batch, for files
(``fetch --to``): one schema for the whole stream, Arrow's own types, Deephaven's metadata dropped.
"""

from __future__ import annotations

import decimal
import json
import re
import unicodedata

import pandas as pd
import pyarrow as pa

from .errors import TableFileError, UsageError

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


def to_ipc(value, what: str = "the table", var: str | None = None) -> bytes:
    """A pandas DataFrame or pyarrow Table as one Arrow IPC stream that Deephaven's converter takes:
    a meaningful index becomes columns, categoricals are decoded, large strings/binaries narrowed.

    Column names Deephaven cannot take are refused first (UsageError naming ``what``, and the rename of
    ``var``, the notebook variable holding the value, that fixes them): see ``check_column_names``."""
    if isinstance(value, pd.DataFrame):
        df = value if isinstance(value.index, pd.RangeIndex) and value.index.name is None else value.reset_index()
        check_column_names(list(df.columns), what, var, "DataFrame")
        table = pa.Table.from_pandas(df, preserve_index=False)
    elif isinstance(value, pa.Table):
        check_column_names(value.column_names, what, var, "Arrow table")
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


# Deephaven's rules for a column name (io.deephaven.api.util.NameValidator, whose legalizeColumnName its
# Arrow converter applies): ASCII letters, digits, _ and $, not first a digit, not a Java keyword or
# literal, not a name its query language reserves. A name it would change reaches the server as a column
# that is then missing (a NullPointerException on every display), or fails with a raw Java error.
_QUERY_RESERVED = frozenset({"in", "not", "i", "ii", "k"})
_JAVA_KEYWORDS = frozenset("""
    abstract assert boolean break byte case catch char class const continue default do double else enum
    extends final finally float for goto if implements import instanceof int interface long native new
    package private protected public return short static strictfp super switch synchronized this throw
    throws transient try void volatile while true false null _""".split())
_COLUMN_NAME = re.compile(r"[A-Za-z_$][A-Za-z0-9_$]*")


def column_name_problem(name: object) -> str | None:
    """Why Deephaven cannot take ``name`` (a DataFrame's column label) as a column name; None if it can."""
    if not isinstance(name, str):
        return f"not text but {type(name).__name__} {name!r}"
    if not name:
        return "empty"
    if name in _JAVA_KEYWORDS:
        return "a Java keyword (Deephaven's formulas are Java)"
    if name in _QUERY_RESERVED:
        return "reserved in Deephaven's query language (in, not, i, ii, k)"
    if not _COLUMN_NAME.fullmatch(name):
        return "a name may hold only ASCII letters, digits, _ and $, and not start with a digit"
    return None


def legal_column_name(name: object, taken: set[str] = frozenset()) -> str:
    """A name Deephaven takes for the column ``name`` (as its legalizeColumnName makes it, accented letters
    spelt without their accents, ``column_`` before a digit or a reserved word), not one of ``taken``."""
    text = unicodedata.normalize("NFKD", str(name))
    legal = re.sub(r"[^A-Za-z0-9_$]", "", text)
    if legal in _QUERY_RESERVED or legal in _JAVA_KEYWORDS or legal[:1].isdigit():
        legal = "column_" + legal
    legal = legal or "column"
    out, n = legal, 2
    while out in taken:
        out, n = f"{legal}{n}", n + 1
    return out


def check_column_names(names: list, what: str, var: str | None = None, kind: str = "DataFrame") -> None:
    """UsageError, before anything is sent, when Deephaven cannot take some of ``names`` (or two are the
    same): each bad name with why, and the rename that fixes them all (of the notebook variable ``var``)."""
    bad = [(n, why) for n in names if (why := column_name_problem(n))]
    seen: set = set()
    twice = [n for n in names if n in seen or seen.add(n)]
    if not bad and not twice:
        return
    taken = {n for n in names if isinstance(n, str) and column_name_problem(n) is None}
    renames = {}
    for n, _ in bad:
        renames[n] = legal_column_name(n, taken)
        taken.add(renames[n])
    lines = [f"  {n!r}: {why}" for n, why in bad] + [f"  {n!r}: appears twice" for n in dict.fromkeys(twice)]
    if kind == "DataFrame":
        fix = (f"{var or 'df'} = {var or 'df'}.rename(columns={renames!r})" if renames
               else f"{var or 'df'}.columns = [...]  # one name each")
    else:
        fixed = [renames.get(n, n) for n in names]
        fix = f"{var or 'table'} = {var or 'table'}.rename_columns({fixed!r})"
    raise UsageError(f"{what}: Deephaven cannot take {len(lines)} of this {kind}'s column names, so nothing was "
                     f"sent and the cell did not run:\n" + "\n".join(lines) +
                     f"\nRename them, e.g.\n  {fix}\nand run the cell again.")


def deephaven_type(field: pa.Field) -> str | None:
    """The Java type Deephaven gave a column (``char``, ``java.math.BigDecimal``…), if it said."""
    value = (field.metadata or {}).get(b"deephaven:type")
    return value.decode() if value is not None else None


def _is_char(field: pa.Field) -> bool:
    """A Java ``char`` column, which Deephaven sends as its uint16 code."""
    return deephaven_type(field) == "char" and pa.types.is_integer(field.type)


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


def _python_values(field: pa.Field):
    """How to turn a column's raw values into Python objects, for the Java types Deephaven sends as bytes."""
    convert = _PYTHON_VALUES.get(deephaven_type(field) or "")
    return convert if convert is not None and pa.types.is_binary(field.type) else None


# Precision of the decimal a file gets for BigDecimal/BigInteger (the widest decimal128; what Spark and
# most parquet readers take).
DECIMAL_PRECISION = 38


def _scale(value: decimal.Decimal | int) -> int:
    return 0 if isinstance(value, int) else max(0, -value.as_tuple().exponent)


class PlainBatches:
    """Deephaven's Arrow record batches (or tables) as plain Arrow with the types a file's reader expects,
    one batch at a time: ``char`` becomes a one-character string, ``BigDecimal`` a ``decimal128(38, S)``,
    ``BigInteger`` a ``decimal128(38, 0)``, ``LocalDate`` a ``date32``; Deephaven's metadata is dropped.

    With ``text`` (CSV, which holds no nested values), arrays and vectors become JSON text and
    BigDecimal/BigInteger their exact digits. ``schema`` is the same for every batch of one stream: a
    BigDecimal column's scale S is the largest in the first batch converted (so a writer that buffers
    gets a better guess); a later value with more decimal places cannot be written and says so.
    """

    def __init__(self, schema: pa.Schema, text: bool = False):
        self.source = schema
        self.text = text
        self._scales: dict[int, int] = {}
        self._schema: pa.Schema | None = None

    @property
    def schema(self) -> pa.Schema:
        """The output schema (final once the first batch is converted: it fixes decimal scales)."""
        if self._schema is None:
            self._schema = pa.schema([pa.field(f.name, self._type(i, f)) for i, f in enumerate(self.source)])
        return self._schema

    def _type(self, i: int, field: pa.Field) -> pa.DataType:
        if _is_char(field):
            return pa.string()
        if _python_values(field) is not None:
            if self.text:
                return pa.string()
            return pa.decimal128(DECIMAL_PRECISION, self._scales.get(i, 0))
        if self.text and (pa.types.is_list(field.type) or pa.types.is_large_list(field.type)):
            return pa.string()
        if pa.types.is_date64(field.type):
            return pa.date32()
        return field.type

    def convert(self, batch: pa.RecordBatch | pa.Table) -> pa.RecordBatch | pa.Table:
        """One batch (or a table of several) in the output schema."""
        values = {i: [convert(v) for v in batch.column(i).to_pylist()]
                  for i, f in enumerate(self.source) if (convert := _python_values(f)) is not None}
        if self._schema is None:  # the first batch fixes each BigDecimal column's scale
            self._scales = {i: max((_scale(v) for v in vs if v is not None), default=0) for i, vs in values.items()}
        schema = self.schema
        columns = []
        for i, (field, out) in enumerate(zip(self.source, schema)):
            column = batch.column(i)
            if i in values:
                column = self._decimals(field.name, values[i], out.type)
            elif _is_char(field):
                column = _chars(column)
            elif out.type != field.type:
                column = _json_text(column) if pa.types.is_string(out.type) else column.cast(out.type)
            columns.append(column)
        return type(batch).from_arrays(columns, schema=schema)

    @staticmethod
    def _decimals(name: str, values: list, out: pa.DataType) -> pa.Array:
        if pa.types.is_string(out):
            return pa.array([None if v is None else str(v) if isinstance(v, int) else format(v, "f") for v in values],
                            type=out)
        try:
            return pa.array(values, type=out)
        except (pa.ArrowInvalid, decimal.InvalidOperation):
            worst = max((v for v in values if v is not None), key=lambda v: (_scale(v), len(str(v))))
            raise TableFileError(
                f"column {name!r} holds {worst}, which does not fit the file's decimal({out.precision}, {out.scale}) "
                f"(the scale was fixed by the first rows written). Give the column one scale in Deephaven first, "
                f"e.g. t.update(\"{name} = {name}.setScale({_scale(worst)}, java.math.RoundingMode.HALF_UP)\"), "
                f"or write CSV, which keeps every digit") from None


def _json_text(column) -> pa.Array:
    """Nested values (arrays, vectors) as JSON text, for CSV."""
    return pa.array([None if v is None else json.dumps(v, default=str) for v in column.to_pylist()], type=pa.string())


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
        if _is_char(field):
            table = table.set_column(i, field.with_type(pa.string()), _chars(table.column(i)))
        elif (convert := _python_values(field)) is not None:
            later[field.name] = convert
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
