"""Tables as local files: which format a file name means, reading one (``dhvm exec -i NAME=FILE``), and
writing a table that streams in batch by batch (``fetch NAME --to FILE``) without ever leaving a
partial file under the target's name.

A table is written to a hidden temporary file beside the target (same directory, so the last step
is one atomic rename) and renamed when its last batch is in; a failure or an interrupt removes the
temporary file instead. Parquet gets row groups of about ``ROW_GROUP_ROWS`` rows or
``ROW_GROUP_BYTES`` (not one per record batch), CSV pyarrow's ``CSVWriter``, Arrow an IPC file
(which is what Feather v2 is). The types are the plain Arrow ones of ``tables.PlainBatches``.
"""

from __future__ import annotations

import os
import queue
import secrets
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pyarrow as pa

from .errors import TableFileError, UsageError
from .tables import PlainBatches

# File name endings and the format each means (``--format`` overrides).
FORMATS = {".parquet": "parquet", ".csv": "csv", ".arrow": "arrow", ".feather": "arrow"}
FORMAT_NAMES = ("parquet", "csv", "arrow")
# A parquet row group is written when this many rows, or bytes of Arrow data, are buffered.
ROW_GROUP_ROWS = 1_000_000
ROW_GROUP_BYTES = 64 * 2**20
# Tables smaller than this get no progress bar (it would only flash).
PROGRESS_MIN_ROWS = 100_000
MIB = 2**20


def format_of(path: str | os.PathLike, fmt: str | None = None, what: str | None = None) -> str:
    """The format ``path`` is written in (``fetch --to``, where ``--format`` may say it: ``fmt``) or read in
    (``what``: the option that named it, e.g. ``-i t=x.csv``), by its extension."""
    if fmt is not None:
        if fmt not in FORMAT_NAMES:
            raise UsageError(f"--format {fmt}: unknown format; choose one of {', '.join(FORMAT_NAMES)}")
        return fmt
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        names = ", ".join("*" + s for s in FORMATS)
        raise UsageError(f"{what or f'--to {path}'}: cannot tell the file's format from "
                         f"{suffix or 'a name without an extension'!r}; name it {names}"
                         + ("" if what else f", or add --format {'|'.join(FORMAT_NAMES)}"))
    return FORMATS[suffix]


def check_target(path: str | os.PathLike, fmt: str | None = None, force: bool = False) -> tuple[Path, str]:
    """Where ``fetch --to`` writes, and in which format; a UsageError, before anything is fetched, when
    the file exists (without ``force``), is a directory, or its directory does not exist."""
    target = Path(path).expanduser()
    fmt = format_of(target, fmt)
    if target.is_dir():
        raise UsageError(f"--to {path}: that is a directory; give a file name (e.g. {Path(path) / 'table'}.{fmt})")
    if target.exists() and not force:
        raise UsageError(f"--to {path}: the file already exists; add --force to overwrite it")
    if not target.parent.is_dir():
        raise UsageError(f"--to {path}: the directory {target.parent} does not exist; create it first "
                         f"(mkdir -p {target.parent})")
    return target, fmt


def read_table(path: str | os.PathLike, what: str = "-i") -> pa.Table:
    """A local parquet, CSV or Arrow (IPC file or stream) file as an Arrow table, by its extension."""
    p = Path(path).expanduser()
    fmt = format_of(p, what=what)
    if not p.is_file():
        raise UsageError(f"{what}: there is no file {p}" + ("" if p.is_absolute() else f" (in {Path.cwd()})"))
    try:
        if fmt == "parquet":
            import pyarrow.parquet as pq

            return pq.read_table(p)
        if fmt == "csv":
            import pyarrow.csv as pcsv

            return pcsv.read_csv(p)
        try:
            return pa.ipc.open_file(pa.OSFile(str(p))).read_all()
        except pa.ArrowInvalid:  # not the file format: an IPC stream, as pyarrow and Deephaven also write
            return pa.ipc.open_stream(pa.OSFile(str(p))).read_all()
    except (pa.ArrowException, OSError) as e:
        raise TableFileError(f"{what}: could not read {p} as {fmt}: {e}") from None


@dataclass
class WrittenFile:
    """What ``fetch --to`` wrote."""

    path: Path
    table: str
    """The Deephaven table's name."""
    format: str
    rows: int
    columns: int
    bytes: int
    """The file's size."""
    seconds: float
    """From asking for the table to the file under its name."""

    def __str__(self) -> str:
        size = f"{self.bytes / MIB:.1f} MiB" if self.bytes >= MIB else f"{self.bytes:,} bytes"
        return (f"dhvm: wrote {self.table}: {self.rows:,} rows x {self.columns} columns, {size} of {self.format}, "
                f"in {self.seconds:.2f} s to {self.path}")

    __repr__ = __str__  # the one line is what IPython shows as the magic's Out[]


def _progress_file():
    """Where the progress bar is drawn: stderr; in a Jupyter kernel one output updated in place instead (a
    stream output cannot be taken back, so the bar's erasing at its end left an empty stderr box)."""
    try:
        from IPython import get_ipython
    except ImportError:
        return sys.stderr
    shell = get_ipython()
    return _DisplayLine() if getattr(shell, "kernel", None) is not None else sys.stderr


class _DisplayLine:
    """A file for tqdm that shows the last line written (after its last carriage return) as one display
    output, updated in place; an empty line empties the output (nothing shows)."""

    def __init__(self):
        self._line = ""
        self._shown = ""
        self._handle = None

    def write(self, text: str) -> int:
        self._line = (self._line + text).rsplit("\r", 1)[-1]
        return len(text)

    def flush(self) -> None:
        text = self._line.strip()
        if text == self._shown:
            return
        from IPython.display import display

        data = {"text/plain": text} if text else {}
        if self._handle is None:
            self._handle = display(data, raw=True, display_id=True)
        else:
            self._handle.update(data, raw=True)
        self._shown = text


class TableFileWriter:
    """One table streamed into one file: ``begin`` with its schema, ``write`` each batch as it arrives, then
    ``finish``. Batches are converted and written on a thread of the writer's own, so the thread reading
    the stream only hands them over: the stream is read while the file is written, and a Ctrl-C lands
    in the request (which cancels it), not in a parquet encoder.

    ``begin`` and ``write`` never raise: the first failure (a write error, a value the file cannot hold)
    is kept, ``on_error`` is called once with it (to stop the stream), later batches are dropped, and
    ``check`` or ``finish`` raise it. Used as a context manager, any exception (an interrupt included)
    aborts: the temporary file is removed and nothing appears under ``path``. ``progress``: a bar on
    stderr (None: for tables of ``PROGRESS_MIN_ROWS`` rows or more).
    """

    def __init__(self, path: Path, fmt: str, name: str = "", force: bool = False, progress: bool | None = None,
                 on_error: Callable[[BaseException], None] | None = None):
        self.path, self.format, self.name, self.force, self.progress = path, fmt, name, force, progress
        self.on_error = on_error
        self.tmp: Path | None = None
        self.rows = 0
        """Rows written so far."""
        self.total = 0
        """Rows the table has (the server's word)."""
        self.source: pa.Schema | None = None
        """Deephaven's schema of the table (batches are decoded with it)."""
        self.failure: BaseException | None = None
        self._plain: PlainBatches | None = None
        self._sink = None
        self._writer = None
        self._buffered: list[pa.RecordBatch] = []
        self._buffered_rows = self._buffered_bytes = 0
        self._bar = None
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._t0 = time.perf_counter()

    def __enter__(self) -> "TableFileWriter":
        return self

    def __exit__(self, kind, exc, tb) -> None:
        if kind is not None:
            self.abort()

    def begin(self, rows: int, schema: pa.Schema) -> None:
        """The table's size and Deephaven's Arrow schema: the temporary file is made beside the target."""
        if len(schema) == 0:  # refused, but not stopped: with no columns, nothing worth stopping follows
            self.failure = TableFileError(f"{self.name} has no columns ({rows:,} rows of nothing): there is nothing "
                                          f"to write to {self.path}")
            return
        try:
            self._begin(rows, schema)
        except BaseException as e:  # noqa: BLE001 - kept for check(); the stream is stopped first
            self.fail(e)

    def _begin(self, rows: int, schema: pa.Schema) -> None:
        self.total, self.source = rows, schema
        self._plain = PlainBatches(schema, text=self.format == "csv")
        # O_EXCL on a random name: never someone else's file; created with the user's umask like any file.
        for _ in range(10):
            tmp = self.path.with_name(f".{self.path.name}.{secrets.token_hex(4)}.part")
            try:
                os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
                break
            except FileExistsError:
                continue
            except OSError as e:
                raise TableFileError(f"cannot write in {self.path.parent}: {e}") from None
        else:
            raise TableFileError(f"cannot make a temporary file beside {self.path}")
        self.tmp = tmp
        show = self.progress if self.progress is not None else rows >= PROGRESS_MIN_ROWS
        if show:
            from tqdm import tqdm

            self._bar = tqdm(total=rows, unit=" rows", unit_scale=True, file=_progress_file(), leave=False,
                             desc=f"{self.name} -> {self.path.name}", dynamic_ncols=True)
        self._thread = threading.Thread(target=self._work, name="dhg-table-writer", daemon=True)
        self._thread.start()

    def write(self, batch: pa.RecordBatch) -> None:
        """Hand over one record batch (in Deephaven's schema) to the writer's thread."""
        if self.failure is None and self._thread is not None:
            self._queue.put(batch)

    def check(self) -> None:
        """Raise the writer's failure, if it had one."""
        if self.failure is not None:
            raise self.failure

    def fail(self, e: BaseException) -> None:
        """Give up on the file because of ``e`` (raised by ``check``); ``on_error`` hears of it once."""
        with self._lock:
            if self.failure is not None:
                return
            self.failure = e
        if self.on_error is not None:
            self.on_error(e)

    def _work(self) -> None:
        while True:
            batch = self._queue.get()
            if batch is None or self._stop.is_set():
                return
            try:
                self._write(batch)
            except BaseException as e:  # noqa: BLE001 - kept for check(); the stream is stopped first
                self.fail(e)
                return

    def _join(self) -> None:
        """Wait until the thread has written what it was given (or, after abort, the batch it is on)."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    def _write(self, batch: pa.RecordBatch) -> None:
        try:
            if self.format == "parquet":  # buffered into row groups of a sensible size
                self._buffered.append(batch)
                self._buffered_rows += batch.num_rows
                self._buffered_bytes += batch.nbytes
                if self._buffered_rows >= ROW_GROUP_ROWS or self._buffered_bytes >= ROW_GROUP_BYTES:
                    self._flush()
            else:
                self._emit(self._plain.convert(batch))
        except (OSError, pa.ArrowException) as e:
            raise TableFileError(f"could not write {self.path}: {e}; nothing was written under that name") from None
        self.rows += batch.num_rows
        if self._bar is not None:
            self._bar.update(batch.num_rows)

    def _flush(self) -> None:
        if self._buffered:
            group = self._plain.convert(pa.Table.from_batches(self._buffered, schema=self.source))
            self._buffered, self._buffered_rows, self._buffered_bytes = [], 0, 0
            self._emit(group)

    def _emit(self, data: pa.RecordBatch | pa.Table | None) -> None:
        """Write converted ``data``, opening the file's writer first (None: only that)."""
        if self._writer is None:
            schema = self._plain.schema
            self._sink = pa.OSFile(str(self.tmp), "wb")
            if self.format == "parquet":
                import pyarrow.parquet as pq

                self._writer = pq.ParquetWriter(self._sink, schema)
            elif self.format == "csv":
                import pyarrow.csv as pcsv

                self._writer = pcsv.CSVWriter(self._sink, schema)
            else:
                self._writer = pa.ipc.new_file(self._sink, schema)
        if data is None or data.num_rows == 0:
            return
        if self.format == "parquet":
            self._writer.write_table(data, row_group_size=data.num_rows)
        elif isinstance(data, pa.Table):
            self._writer.write_table(data)
        else:
            self._writer.write_batch(data)

    def finish(self, rows: int | None = None) -> WrittenFile:
        """Write what is still pending, close the file and give it its name; ``rows``: how many the server
        said it sent (checked)."""
        self._join()
        self.check()
        if self.source is None:
            raise TableFileError(f"the server sent no table for {self.name!r}; nothing was written")
        expected = self.total if rows is None else rows
        if self.rows != expected:
            raise TableFileError(f"the stream of {self.name} ended after {self.rows:,} of {expected:,} rows; "
                                 f"nothing was written to {self.path}")
        try:
            if self.format == "parquet":
                self._flush()
            self._emit(None)
            self._close()
            self._rename()
        except (OSError, pa.ArrowException) as e:
            raise TableFileError(f"could not write {self.path}: {e}; nothing was written under that name") from None
        return WrittenFile(self.path, self.name, self.format, self.rows, len(self.source), self.path.stat().st_size,
                           time.perf_counter() - self._t0)

    def _rename(self) -> None:
        if self.force:
            os.replace(self.tmp, self.path)
        else:
            try:  # a link refuses to replace a file that appeared meanwhile (a rename would not)
                os.link(self.tmp, self.path)
            except FileExistsError:
                raise UsageError(f"--to {self.path}: the file appeared while the table was fetched; add --force "
                                 f"to overwrite it") from None
            except OSError:  # a file system without hard links
                if self.path.exists():
                    raise UsageError(f"--to {self.path}: the file already exists; add --force to overwrite it") from None
                os.rename(self.tmp, self.path)
                self.tmp = None
                return
            os.unlink(self.tmp)
        self.tmp = None

    def _close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        writer, sink, self._writer, self._sink = self._writer, self._sink, None, None
        try:
            if writer is not None:
                writer.close()
        finally:
            if sink is not None:
                sink.close()

    def abort(self) -> None:
        """Drop everything written so far (idempotent)."""
        self._stop.set()
        self._join()
        self._buffered = []
        try:
            self._close()
        except (OSError, pa.ArrowException):
            pass  # the file goes anyway
        if self.tmp is not None:
            try:
                os.unlink(self.tmp)
            except FileNotFoundError:
                pass
            self.tmp = None
