"""Data the host hands a cell before it runs (``%%dhvm -i NAME``): a DataFrame or Arrow table arrives
as an Arrow IPC payload and is bound as a Deephaven table; a JSON-able value arrives as a UTF-8 JSON
payload and is bound as itself. All inputs are decoded before any is bound, so a bad one changes nothing."""

from __future__ import annotations

import json


class InputRejected(Exception):
    """An input the agent cannot bind (a bad name, a missing payload, an unknown kind)."""


def bind_inputs(ns: dict, inputs: list, payloads: list) -> list[str]:
    """Bind every input in ``ns`` under its name; returns the names."""
    values: dict[str, object] = {}
    for spec in inputs:
        name = spec.get("name") if isinstance(spec, dict) else None
        if not isinstance(name, str) or not name.isidentifier():
            raise InputRejected(f"input name {name!r} is not a Python identifier")
        kind, index = spec.get("kind"), spec.get("payload")
        if not isinstance(index, int) or not 0 <= index < len(payloads):
            raise InputRejected(f"input {name!r}: payload {index!r} was not sent")
        if kind == "table":
            values[name] = _deephaven_table(payloads[index])
        elif kind == "json":
            values[name] = json.loads(bytes(payloads[index]))
        else:
            raise InputRejected(f"input {name!r}: unknown kind {kind!r}")
    ns.update(values)
    return list(values)


def _deephaven_table(ipc):
    """An Arrow IPC stream as a Deephaven table (Deephaven's own Arrow-to-table converter)."""
    import pyarrow as pa
    from deephaven.arrow import to_table

    return to_table(pa.ipc.open_stream(pa.py_buffer(ipc)).read_all())
