"""Completion and inspection from the live namespace: what Tab and Shift-Tab (or ``?``) show.

jedi completes from the cell namespace itself (no static guessing); inside a query string on a table
(``t.where("Pr``) the table's column names are offered instead. Inspection resolves the dotted name
at the cursor by attribute lookups only (never a call) and describes a Deephaven table by its size
and columns. The agent answers these on threads of its own, so they never wait for a running cell.
"""

from __future__ import annotations

import builtins
import re
from typing import Callable

from .common import log

_COLUMN_CONTEXT = re.compile(r"(\w+)\s*\.\s*\w+\((?:[^()]*?)[\"']([^\"']*)$")
# What the first Tabs of a session touch: the names of a module (which makes jedi read typing and
# types), Deephaven's API, a table's methods, the common data libraries, builtins.
_WARM_UP_CODE = ("import os\nos.pa", "import os\nos.path.jo", "import sys\nsys.", "import typing\ntyping.",
                 "import types\ntypes.", "import datetime\ndatetime.", "import collections\ncollections.",
                 "import deephaven\ndeephaven.", "from deephaven import empty_table\nempty_table(1).up",
                 "import numpy as np\nnp.", "import pandas as pd\npd.", "import matplotlib.pyplot as plt\nplt.",
                 "pri")


def complete(ns: dict, is_table: Callable[[object], bool], code: str, cursor_pos: int) -> dict:
    """Completions from the live namespace (jedi), and column names inside query strings."""
    ctx = _COLUMN_CONTEXT.search(code[:cursor_pos])
    if ctx and is_table(ns.get(ctx.group(1))):
        # Inside a query string on a table: offer its column names.
        frag = re.search(r"(\w*)$", ctx.group(2)).group(1)
        cols = [c.name for c in ns[ctx.group(1)].columns if c.name.startswith(frag)]
        if cols:
            return {"matches": cols, "cursor_start": cursor_pos - len(frag), "cursor_end": cursor_pos,
                    "types": ["column"] * len(cols)}
    import jedi

    line, col = _line_col(code, cursor_pos)
    comps = jedi.Interpreter(code, [ns]).complete(line, col)[:1000]
    typed = len(comps[0].name) - len(comps[0].complete) if comps else 0
    return {"matches": [c.name for c in comps], "cursor_start": cursor_pos - typed, "cursor_end": cursor_pos,
            "types": [c.type for c in comps]}


def inspect(ns: dict, is_table: Callable[[object], bool], code: str, cursor_pos: int, detail_level: int = 0) -> dict:
    """What Shift-Tab / ``?`` shows for the name at the cursor (tables: size and columns)."""
    left = re.search(r"([\w.]+)$", code[:cursor_pos])
    right = re.match(r"\w*", code[cursor_pos:])
    dotted = ((left.group(1) if left else "") + (right.group(0) if right else "")).strip(".")
    if not dotted:
        dotted = _callee_at(code, cursor_pos)
    if not dotted:
        return {"found": False, "data": {}}
    try:
        obj = _resolve(ns, dotted)
    except Exception:  # noqa: BLE001 - unknown names are simply not found
        return {"found": False, "data": {}}
    import inspect as pyinspect

    lines = [f"{dotted}: {type(obj).__module__}.{type(obj).__qualname__}"]
    if is_table(obj):
        lines.append(f"Deephaven table: {obj.size:,} rows{' (ticking)' if obj.is_refreshing else ''}")
        lines.append("Columns:")
        lines.extend(f"  {c.name:<24} {c.data_type}" for c in obj.columns)
    else:
        try:
            lines.append(f"Signature: {dotted}{pyinspect.signature(obj)}")
        except (TypeError, ValueError):
            pass
        if not callable(obj):
            lines.append(f"Value: {_safe_repr(obj)[:500]}")
    doc = pyinspect.getdoc(obj)
    if doc and (detail_level > 0 or not is_table(obj)):
        lines.append("Docstring:\n" + doc)
    if detail_level > 0:
        try:
            lines.append("Source:\n" + pyinspect.getsource(obj))
        except (TypeError, OSError):
            pass
    return {"found": True, "data": {"text/plain": "\n".join(lines)}}


def warm(ns: dict, is_table: Callable[[object], bool]) -> None:
    """Import and exercise jedi before the snapshot, so the first Tab in a clone answers at once."""
    for code in _WARM_UP_CODE:
        try:
            complete(ns, is_table, code, len(code))
            inspect(ns, is_table, code, len(code) - 2, 0)
        except Exception as e:  # noqa: BLE001 - warming is best effort
            log(f"introspection warm-up: {type(e).__name__}: {e}")


def _callee_at(code: str, cursor_pos: int) -> str:
    """The dotted name of the call whose arguments the cursor is in (``t.update(`` -> ``t.update``),
    as a plain kernel's Shift-Tab finds it; "" when the cursor is in no call."""
    depth = 0
    for i in range(cursor_pos - 1, -1, -1):
        ch = code[i]
        if ch in ")]}":
            depth += 1
        elif ch in "([{":
            if depth > 0:
                depth -= 1
            elif ch == "(":
                m = re.search(r"([\w.]+)\s*$", code[:i])
                return m.group(1).strip(".") if m else ""
            # an open list or dict at this level: the call (if any) is further out
        elif ch == "\n" and depth == 0 and not code[:i].rstrip().endswith((",", "(", "\\")):
            return ""  # a new statement: no open call around the cursor
    return ""


def _resolve(ns: dict, dotted: str):
    """The object a dotted name refers to in ``ns`` (attribute lookups only, no calls)."""
    head, *rest = dotted.split(".")
    obj = ns[head] if head in ns else getattr(builtins, head)
    for part in rest:
        obj = getattr(obj, part)
    return obj


def _line_col(code: str, cursor_pos: int) -> tuple[int, int]:
    """jedi's 1-based line and 0-based column of a character offset."""
    before = code[:cursor_pos]
    return before.count("\n") + 1, len(before) - (before.rfind("\n") + 1)


def _safe_repr(value) -> str:
    try:
        return repr(value)
    except Exception as e:  # noqa: BLE001 - a broken __repr__ must not fail an inspection
        return f"<{type(value).__name__} (repr failed: {e})>"
