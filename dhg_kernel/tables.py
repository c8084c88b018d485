"""Arrow IPC from the guest to pandas, with Deephaven's types kept.

``numpy_nullable`` (the default) keeps integer and boolean columns integer and boolean even when
they hold nulls (pandas ``Int64``/``boolean``); floats stay ``float64`` with NaN; strings stay
``object``; Deephaven ``Instant`` columns become ``datetime64[ns, UTC]``.
"""

from __future__ import annotations

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


def to_pandas(table: pa.Table, dtype_backend: str = "numpy_nullable") -> pd.DataFrame:
    """Convert an Arrow table to a DataFrame with the chosen dtype backend."""
    if dtype_backend == "numpy_nullable":
        return table.to_pandas(types_mapper=_NULLABLE.get)
    if dtype_backend == "pyarrow":
        return table.to_pandas(types_mapper=pd.ArrowDtype)
    if dtype_backend == "numpy":
        return table.to_pandas()
    raise ValueError(f"unknown dtype_backend {dtype_backend!r}; choose one of {', '.join(DTYPE_BACKENDS)}")
