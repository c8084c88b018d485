"""Which workspace files a cell names, and whether they may travel into the VM.

This module decides; it does not send (``server.py`` does). It also keeps the ledger of what an agent
already has (``Pushed``), so an unchanged file is not sent twice. A file travels when a string literal
in the cell (found with Python's tokenizer, so comments and f-strings are ignored, and calls like
``Path("data/x.csv")`` are seen) names a relative path with a data extension that exists as a
regular file whose real path lies inside the workspace.
"""

from __future__ import annotations

import ast
import hashlib
import io
import json
import os
import time
import tokenize
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from .config import DATA_EXTENSIONS, DEFAULT_MAX_PUSH_MB
from .errors import FileLimitError, FileNotPushable, UsageError

MIB = 1024 * 1024


@dataclass(frozen=True)
class PushFile:
    """A workspace file to send: its path as the guest sees it and where it is on the host."""

    rel: str
    """Normalised workspace-relative path (``data/trades.csv``), also its path under the guest workdir."""
    path: Path
    """Real path on the host."""
    size: int
    """Size in bytes when scanned."""


@dataclass
class ScanReport:
    """What a scan found: files to push, and literals that looked like files but were skipped (and why)."""

    files: list[PushFile] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


def string_literals(code: str) -> list[str]:
    """Every plain string literal in ``code`` (bytes and f-strings excluded), in order.

    Incomplete code is tokenized as far as it goes.
    """
    found: list[str] = []
    try:
        for tok in tokenize.generate_tokens(io.StringIO(code).readline):
            if tok.type != tokenize.STRING:
                continue
            prefix = tok.string[: len(tok.string) - len(tok.string.lstrip("rRbBuUfF"))].lower()
            if "b" in prefix or "f" in prefix:
                continue
            try:
                value = ast.literal_eval(tok.string)
            except (ValueError, SyntaxError):
                continue
            if isinstance(value, str):
                found.append(value)
    except (tokenize.TokenError, IndentationError, SyntaxError):
        pass
    return found


def _normalise_ext(extensions: Iterable[str]) -> tuple[str, ...]:
    return tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)


def check_path(literal: str, workspace: Path) -> PushFile:
    """The PushFile for a workspace-relative path, or ValueError saying why it cannot travel."""
    if not literal or "\x00" in literal or "\n" in literal:
        raise ValueError("not a path")
    if os.path.isabs(literal) or literal.startswith("~"):
        raise ValueError("absolute paths are never pushed")
    norm = os.path.normpath(literal)
    if norm == ".." or norm.startswith(".." + os.sep):
        raise ValueError("'..' leaves the workspace")
    root = Path(os.path.realpath(workspace))
    candidate = root / norm
    if not candidate.exists():
        raise ValueError("does not exist")
    real = Path(os.path.realpath(candidate))
    if real != root and root not in real.parents:
        raise ValueError(f"resolves outside the workspace (to {real})")
    if not real.is_file():
        raise ValueError("not a regular file")
    return PushFile(rel=Path(norm).as_posix(), path=real, size=real.stat().st_size)


def scan(code: str, workspace: Path, extensions: Sequence[str] = DATA_EXTENSIONS) -> ScanReport:
    """Find the workspace files a cell names."""
    exts = _normalise_ext(extensions)
    report = ScanReport()
    seen: set[str] = set()
    for literal in string_literals(code):
        if not literal.lower().endswith(exts) or literal in seen:
            continue
        seen.add(literal)
        try:
            pf = check_path(literal, workspace)
        except ValueError as e:
            report.skipped.append((literal, str(e)))
            continue
        if all(f.rel != pf.rel for f in report.files):
            report.files.append(pf)
    return report


def add_explicit(report: ScanReport, paths: Sequence[str], workspace: Path) -> ScanReport:
    """Add files named with ``--file``; unlike scanned literals, a bad one is an error."""
    for p in paths:
        try:
            pf = check_path(p, workspace)
        except ValueError as e:
            raise FileNotPushable(
                f"--file {p}: {e}. Only regular files inside the workspace ({workspace}) can be pushed; "
                f"give a path relative to it.") from None
        if all(f.rel != pf.rel for f in report.files):
            report.files.append(pf)
    return report


def check_limit(files: Sequence[PushFile], limit_mb: float = DEFAULT_MAX_PUSH_MB,
                inputs: Sequence["CellInput"] = ()) -> None:
    """Raise FileLimitError, listing files, inputs (``-i``) and sizes, when they exceed ``limit_mb`` MiB in total."""
    items = [(f.rel, f.size) for f in files] + [(f"-i {i.source}", i.size) for i in inputs]
    total = sum(size for _, size in items)
    if total <= limit_mb * MIB:
        return
    lines = "\n".join(f"  {label:<50} {size / MIB:10.1f} MiB" for label, size in sorted(items, key=lambda x: -x[1]))
    need = total / MIB
    what = f"{len(files)} file(s)" + (f" and {len(inputs)} input(s)" if inputs else "")
    raise FileLimitError(
        f"the cell names {what} totalling {need:.1f} MiB, over the {limit_mb:g} MiB push limit; "
        f"the cell was not run.\n{lines}\n"
        f"Raise the limit with `--max-push-mb {int(need) + 1}` (on `%%dhvm` or `dhvm exec`), for the whole "
        f"session with `%config Dhvm.max_push_mb = {int(need) + 1}`, or skip scanning with `--no-files`.")


@dataclass
class CellInput:
    """A notebook value sent with a cell (``%%dhvm -i``), bound under ``name`` in the VM before the cell
    runs: a DataFrame or Arrow table as Arrow IPC (a Deephaven table there), else a JSON value."""

    source: str
    """The notebook variable it came from."""
    name: str
    kind: str
    """``table`` (the payload is Arrow IPC) or ``json`` (the payload is UTF-8 JSON)."""
    payload: bytes

    @property
    def size(self) -> int:
        return len(self.payload)

    @classmethod
    def of(cls, source: str, name: str, value) -> "CellInput":
        """Encode ``value``; UsageError when it is neither a table nor JSON-able."""
        import pandas as pd
        import pyarrow as pa

        from .tables import to_ipc

        if isinstance(value, (pd.DataFrame, pa.Table)):
            try:
                return cls(source, name, "table", to_ipc(value, f"-i {source}", source if source.isidentifier() else None))
            except (pa.ArrowException, TypeError, ValueError) as e:
                raise UsageError(f"-i {source}: this DataFrame cannot be sent as an Arrow table ({e}); convert the "
                                 f"column it names (e.g. df[col].astype(str)) and run the cell again") from None
        try:
            text = json.dumps(value, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise UsageError(f"-i {source}: a {type(value).__name__} is neither a DataFrame/Arrow table nor "
                             f"JSON-able ({e}); send tables, or numbers, strings, lists and dicts of them") from None
        return cls(source, name, "json", text.encode())

    @classmethod
    def from_file(cls, spec: str) -> "CellInput":
        """``NAME=FILE`` (``dhvm exec -i``): a local parquet, CSV or Arrow file, read with pyarrow and sent as
        the Deephaven table ``NAME``. UsageError for a bad spec, a missing file or an unknown extension."""
        from .tablefiles import FORMATS, read_table

        name, sep, path = spec.partition("=")
        if not sep or not path or not name.isidentifier():
            raise UsageError(f"-i {spec}: write -i NAME=FILE, NAME a Python name and FILE one of "
                             f"{', '.join('*' + s for s in FORMATS)} (e.g. -i trades=data/trades.parquet)")
        return cls.of(spec, name, read_table(path, what=f"-i {spec}"))


# A file whose status changed this close to when it was read may change again within the same clock
# tick without its ctime moving: its status is not trusted, its content is compared (racy-git rule).
RACY_WINDOW_NS = 2_000_000_000


@dataclass
class Pushed:
    """What an agent has of a workspace file: its content hash, and the file status seen then."""

    stat_key: tuple
    """(size, mtime, ctime, inode, device): ctime moves on every write and cannot be set back by a user,
    unlike mtime (os.utime), so a same-size rewrite with the old mtime is still seen."""
    sha256: str
    trusted: bool
    """False when the file changed just before it was read: then the next cell compares content."""


def stat_key(st: os.stat_result) -> tuple:
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)


def files_to_send(pushed: dict[str, Pushed], files: Sequence[PushFile]) -> tuple[list[dict], list[bytes], dict[str, Pushed]]:
    """Of ``files``, the ones an agent holding ``pushed`` lacks: (their metadata, their contents, the
    ledger entries to record once the agent has written them)."""
    metas, datas, record = [], [], {}
    for f in files:
        prev = pushed.get(f.rel)
        if prev and prev.trusted and prev.stat_key == stat_key(f.path.stat()):
            continue  # unchanged: same status, and it had not just changed when it was read
        read_at = time.time_ns()
        with open(f.path, "rb") as fh:
            st = os.fstat(fh.fileno())
            data = fh.read()
        digest = hashlib.sha256(data).hexdigest()
        entry = Pushed(stat_key(st), digest, trusted=st.st_ctime_ns < read_at - RACY_WINDOW_NS)
        record[f.rel] = entry
        if prev and prev.sha256 == digest:
            continue
        metas.append({"path": f.rel, "size": len(data)})
        datas.append(data)
    return metas, datas, record
