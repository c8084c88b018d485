"""The ``%%dhvm`` cell magic and ``%dhvm`` line magic.

Options are declared with ``magic_arguments`` (so ``%%dhvm?`` prints real help) and take their
defaults from traitlets (so ``%config Dhvm.max_rows = 500`` and IPython profiles work).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from IPython.core.magic import Magics, line_cell_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring
from traitlets import Bool, Enum, Float, Integer, List, Unicode, observe

from . import files as files_mod
from .config import (DATA_EXTENSIONS, DEFAULT_DTYPE_BACKEND, DEFAULT_MAX_PUSH_MB, DEFAULT_MAX_ROWS,
                     DEFAULT_TIMEOUT_S, default_backend, default_mode)
from .display import format_mapping, show_display, show_in_ipython
from .errors import UsageError
from .result import CellResult, RemoteValue
from .session import Session
from .tables import DTYPE_BACKENDS

# Pixels of an embedded table or figure view (%dhvm ide NAME).
IDE_FRAME_HEIGHT = 420
LINE_COMMANDS = ("status", "tables", "stats", "fetch", "ide", "reset", "stop")


@magics_class
class Dhvm(Magics):
    """Run cells in a Deephaven server inside a microVM (or a local agent)."""

    backend = Unicode(default_backend(), help="Where cells run: auto (firecracker, else qemu, else local), "
                      "firecracker, qemu or local.").tag(config=True)
    config_dir = Unicode("", help="DHG_HOME for artifacts and run dirs (default: $DHG_HOME or ~/.dhg).").tag(config=True)
    max_rows = Integer(DEFAULT_MAX_ROWS, help="Rows of each result table brought back (the rest stays in the VM).").tag(config=True)
    max_push_mb = Float(DEFAULT_MAX_PUSH_MB, help="Total MiB of workspace files a cell may push.").tag(config=True)
    extensions = List(Unicode(), default_value=list(DATA_EXTENSIONS),
                      help="File extensions the scanner pushes when a cell names them.").tag(config=True)
    timeout = Float(DEFAULT_TIMEOUT_S, help="Seconds before a cell is cancelled (0: no limit).").tag(config=True)
    dtype_backend = Enum(list(DTYPE_BACKENDS), default_value=DEFAULT_DTYPE_BACKEND,
                         help="pandas dtypes for result tables: numpy_nullable, pyarrow or numpy.").tag(config=True)
    verbose = Bool(False, help="Print per-phase timings after every cell.").tag(config=True)
    heap = Unicode("", help="JVM heap of a local Deephaven server (-Xmx; default 2g). A VM's heap is fixed by "
                   "its snapshot: dhvm prepare --heap.").tag(config=True)
    mode = Enum(["per-session", "per-cell"], default_value=default_mode(),
                help="per-session: one server for all cells; per-cell: a fresh server for every cell.").tag(config=True)
    pool_size = Integer(1, help="Per-cell mode: servers kept restored and ready in the background.").tag(config=True)
    network = Bool(False, help="Firecracker: give guests outbound network access (the snapshot must have been "
                   "prepared with --network). Off by default: a VM has no network.").tag(config=True)

    @observe("mode", "pool_size")
    def _mode_changed(self, change) -> None:
        if self._session is None:
            return
        if change["name"] == "mode":
            self._session.set_mode(change["new"])
        else:
            self._session.set_pool_size(change["new"])

    def __init__(self, shell=None, **kwargs):
        super().__init__(shell=shell, **kwargs)
        self._session: Session | None = None

    # -- the session ---------------------------------------------------------------------------

    @property
    def session(self) -> Session:
        if self._session is None:
            # Only what the user set: an unset heap must not make status report a mismatch nobody asked for.
            options = {**({"heap": self.heap} if self.heap else {}), **({"network": True} if self.network else {})}
            self._session = Session(self.backend, self.config_dir or None, mode=self.mode,
                                    pool_size=self.pool_size, **options)
        return self._session

    def close(self) -> None:
        """Destroy the session's VM."""
        if self._session is not None:
            self._session.stop()
            self._session = None

    # -- the magic -----------------------------------------------------------------------------

    @magic_arguments()
    @argument("-o", "--output", action="append", default=[], metavar="NAME[=TABLE]",
              help="Bind a Deephaven table, all its rows, as a local pandas DataFrame (several allowed): "
                   "-o trades binds the table trades; -o df=trades binds it as df.")
    @argument("-i", "--input", action="append", default=[], metavar="NAME[=REMOTE]",
              help="Send a notebook variable into the VM before the cell runs (several allowed): a pandas "
                   "DataFrame or pyarrow Table becomes a Deephaven table, a JSON-able value stays itself. "
                   "-i df binds it as df; -i df=trades binds it as trades.")
    @argument("-n", "--max-rows", type=int, default=None,
              help="Rows of each result table to bring back (default: Dhvm.max_rows, 1000).")
    @argument("-q", "--quiet", action="store_true", help="Do not display result tables.")
    @argument("-v", "--verbose", action="store_true", help="Print per-phase timings and skipped files.")
    @argument("--timeout", type=float, default=None, help="Cancel the cell after this many seconds.")
    @argument("--file", action="append", default=[], metavar="PATH",
              help="Push this workspace file too (for paths the scanner cannot see).")
    @argument("--no-files", action="store_true", help="Do not scan the cell for files to push.")
    @argument("--max-push-mb", type=float, default=None, help="Push limit for this cell, in MiB (default 50).")
    @argument("--per-cell", action="store_true",
              help="Run this cell in a fresh server that is destroyed afterwards (Dhvm.mode for every cell).")
    @argument("command", nargs="*",
              help="Line magic only: status | tables | stats | fetch NAME | ide [NAME] | reset | stop, or code to run.")
    @line_cell_magic
    def dhvm(self, line: str, cell: str | None = None):
        """Run the cell in a Deephaven server inside a microVM; tables come back as DataFrames.

        Line magic: ``%dhvm status``, ``%dhvm tables``, ``%dhvm stats``, ``%dhvm fetch NAME``,
        ``%dhvm ide [NAME]`` (the web UI: the console, or a table or figure), ``%dhvm reset`` (a fresh
        server), ``%dhvm stop``; anything else is run as code.
        """
        if cell is None:
            words = line.split()
            if words and words[0] in LINE_COMMANDS:
                return self._line_command(words)
            if not line.strip():
                return self._line_command(["status"])
            return self._run(line, parse_argstring(self.dhvm, ""))
        return self._run(cell, parse_argstring(self.dhvm, line))

    def _line_command(self, words: list[str]):
        """A ``%dhvm`` subcommand. Errors are DhvmErrors, which IPython shows as their message alone."""
        cmd, rest = words[0], words[1:]
        if cmd == "status":
            st = self.session.status()
            print(format_mapping(st))
            return None
        if cmd == "tables":
            import pandas as pd

            rows = [{"name": t["name"], "rows": t["rows"], "columns": len(t["columns"]),
                     "refreshing": t["refreshing"]} for t in self.session.tables()]
            return pd.DataFrame(rows, columns=["name", "rows", "columns", "refreshing"])
        if cmd == "stats":
            print(format_mapping(self.session.stats()))
            return None
        if cmd == "fetch":
            if len(rest) != 1:
                raise UsageError("usage: %dhvm fetch TABLE_NAME")
            return self.session.fetch(rest[0], self.max_rows, self.dtype_backend).df
        if cmd == "ide":
            if len(rest) > 1:
                raise UsageError("usage: %dhvm ide [NAME] (a table or figure; no name: the console)")
            return self._show_ide(rest[0] if rest else None)
        if cmd == "reset":
            self.session.reset()
            print("dhvm: the server was discarded; the next cell starts a fresh one.")
            return None
        if cmd == "stop":
            self.close()
            print("dhvm: stopped.")
            return None
        raise UsageError(f"unknown command {cmd!r}; choose one of: {', '.join(LINE_COMMANDS)}")

    def _show_ide(self, name: str | None) -> None:
        """A link to the server's web UI (and, for a table or figure, the view itself, embedded)."""
        import html

        from IPython.display import display

        url = self.session.ide_url(name)
        what = f"{name} in Deephaven's web UI" if name else "Deephaven's web UI (console)"
        # The link carries this instance's key: it works while this session's server lives, from this machine.
        link = f'<a href="{html.escape(url)}" target="_blank" rel="noopener">Open {html.escape(what)}</a>'
        frame = f'<iframe src="{html.escape(url)}" width="100%" height="{IDE_FRAME_HEIGHT}" ' \
                f'style="border:1px solid #ccc"></iframe>' if name else ""
        display({"text/plain": f"{what}: {url}", "text/html": link + (f"<br>{frame}" if frame else "")}, raw=True)

    def _run(self, code: str, args):
        workspace = Path(os.getcwd())
        report = files_mod.ScanReport()
        if not args.no_files:
            report = files_mod.scan(code, workspace, self.extensions)
        files_mod.add_explicit(report, args.file, workspace)
        inputs = [files_mod.CellInput.of(local, remote, value) for local, remote, value in self._inputs(args.input)]
        files_mod.check_limit(report.files, args.max_push_mb if args.max_push_mb is not None else self.max_push_mb,
                              inputs)

        outputs = []
        for spec in args.output:
            outputs.append(_name_pair("-o", spec, "TABLE", check_remote=False))
        max_rows = args.max_rows if args.max_rows is not None else self.max_rows
        timeout = args.timeout if args.timeout is not None else self.timeout
        # A backend that cannot start raises a DhvmError: IPython shows its message, the kernel lives on.
        if not args.per_cell:
            self._start_with_notice()
        result = self.session.execute(
            code, report.files, max_rows=max_rows if max_rows > 0 else None, timeout=timeout or None,
            dtype_backend=self.dtype_backend, on_stdout=_writer(sys.stdout), on_stderr=_writer(sys.stderr),
            # -o means "give me the table": the display limit does not cut it.
            full_tables=[remote for _, remote in outputs], mode="per-cell" if args.per_cell else None,
            on_display=show_display, inputs=inputs)
        if self.session.notice:
            print(self.session.notice, file=sys.stderr)
            self.session.notice = None
        result.files_skipped = report.skipped
        if self.shell is not None:
            self.shell.user_ns["_dhvm"] = result
            self._bind_outputs(result, outputs)
        show_in_ipython(result, quiet=args.quiet, verbose=args.verbose or self.verbose)
        return RemoteValue(result.value) if result.value is not None else None

    def _inputs(self, specs: list[str]) -> list[tuple[str, str, object]]:
        """(notebook name, VM name, value) of each ``-i NAME[=REMOTE]``."""
        out = []
        for spec in specs:
            local, remote = _name_pair("-i", spec, "REMOTE")
            ns = self.shell.user_ns if self.shell is not None else {}
            if local not in ns:
                raise UsageError(f"-i {spec}: there is no variable {local!r} in this notebook; run the cell that "
                                 f"defines it first")
            out.append((local, remote, ns[local]))
        return out

    def _start_with_notice(self) -> None:
        """In per-session mode, a cell that has to wait for its server says so while it waits, and
        then how long the start took (one line, updated in place)."""
        s = self.session
        if s.mode != "per-session" or s.running or self.shell is None:
            return
        from IPython.display import display

        t0 = time.perf_counter()
        handle = display({"text/plain": "dhvm: starting the Deephaven server…"}, raw=True, display_id=True)
        try:
            s.start()
        except BaseException:
            if handle is not None:
                handle.update({"text/plain": "dhvm: the Deephaven server could not start"}, raw=True)
            raise
        if handle is not None:
            where = s.backend_name if s.backend_name != "auto" else ""
            handle.update({"text/plain": f"dhvm: {where + ' ' if where else ''}Deephaven server ready in "
                                         f"{time.perf_counter() - t0:.1f} s"}, raw=True)

    def _bind_outputs(self, result: CellResult, outputs: list[tuple[str, str]]) -> None:
        if result.error is not None:
            return  # the cell failed: its error is what the user needs to see
        for local, remote in outputs:
            table = result.full_tables.get(remote)
            if table is None:
                raise UsageError(f"-o {local}: there is no Deephaven table named {remote!r} in the session "
                                     f"(the cell returned: {', '.join(t.name for t in result.tables) or 'none'})")
            self.shell.user_ns[local] = table.df


def _name_pair(flag: str, spec: str, other: str, check_remote: bool = True) -> tuple[str, str]:
    """``NAME`` or ``NAME=OTHER`` of ``-o``/``-i``: (the notebook's name, the server's name)."""
    local, _, remote = spec.partition("=")
    remote = remote or local
    for name in (local, remote) if check_remote else (local,):
        if not name.isidentifier():
            raise UsageError(f"{flag} {spec}: {name!r} is not a valid Python name; write {flag} NAME or "
                             f"{flag} NAME={other}")
    return local, remote


def _writer(stream):
    # No flush per write: ipykernel's stream flushes on its own short interval, which merges the
    # pieces of one print() into one output instead of four.
    return stream.write


def load(ipython) -> Dhvm:
    """Register the magics with ``ipython`` and make ``%config Dhvm.…`` reach them."""
    from .session import install_exit_hooks

    install_exit_hooks()  # here, on the main thread: a kernel's session may be made in a background thread
    magics = Dhvm(shell=ipython)
    ipython.register_magics(magics)
    if magics not in ipython.configurables:
        ipython.configurables.append(magics)
    return magics


def unload(ipython) -> None:
    """Stop the session of the registered magics."""
    magics = ipython.magics_manager.registry.get("Dhvm")
    if magics is not None:
        magics.close()
