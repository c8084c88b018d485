"""The ``%%dhvm`` cell magic and ``%dhvm`` line magic.

Options are declared with ``magic_arguments`` (so ``%%dhvm?`` prints real help) and take their
defaults from traitlets (so ``%config Dhvm.max_rows = 500`` and IPython profiles work).
"""

from __future__ import annotations

import os
import shlex
import sys
import time
from pathlib import Path

from IPython.core.magic import Magics, line_cell_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring
from traitlets import Bool, Enum, Float, Integer, List, TraitError, Unicode, observe, validate

from . import commands
from . import files as files_mod
from .config import (DATA_EXTENSIONS, DEFAULT_DTYPE_BACKEND, DEFAULT_MAX_PUSH_MB, DEFAULT_MAX_ROWS,
                     DEFAULT_TIMEOUT_S, default_backend, default_mode, default_start_from)
from .display import live_view, show_display, show_in_ipython
from .errors import UsageError
from .live import DEFAULT_LIVE_RATE, DEFAULT_LIVE_ROWS
from .registry import MAIN, Sessions
from .result import CellResult, DisplayOutput, RemoteValue, TableResult
from .session import Session
from .tables import DTYPE_BACKENDS
from . import weblinks
from .protocol import DEFAULT_WEB_TIME_ZONE



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
    live = Bool(True, help="Show a ticking table a cell returns as a live view that keeps updating while the "
                "session lives (per-session mode).").tag(config=True)
    live_rows = Integer(DEFAULT_LIVE_ROWS, help="Rows a live view shows (its last rows).").tag(config=True)
    live_rate = Float(DEFAULT_LIVE_RATE, help="Most updates a second a live view shows; bursts of ticks "
                      "are coalesced.").tag(config=True)
    network = Bool(False, help="Firecracker: give guests outbound network access (the snapshot must have been "
                   "prepared with --network). Off by default: a VM has no network.").tag(config=True)
    start_from = Unicode(default_start_from(), help="A checkpoint (dhvm checkpoint list) that every new server "
                         "starts from, per-cell and warm-pool VMs too; empty: the base snapshot. "
                         "Default: $DHG_START_FROM.").tag(config=True)
    snapshot = Unicode("", help="Deprecated name of Dhvm.start_from.").tag(config=True)
    memory_headroom_mb = Integer(None, allow_none=True, help="MiB a new server needs free beyond what its snapshot "
                                 "holds in memory, or it is refused (default: $DHG_MEMORY_HEADROOM_MB or 384).").tag(config=True)

    web_time_zone = Unicode(DEFAULT_WEB_TIME_ZONE, help="The time zone Deephaven's web UI (%dhvm ide, figure links) "
                            "shows times in; an IANA name such as UTC or America/New_York. DataFrames are always "
                            "UTC.").tag(config=True)

    @validate("web_time_zone")
    def _check_web_time_zone(self, proposal) -> str:
        try:
            return weblinks.check_time_zone(proposal["value"])
        except UsageError as e:
            raise TraitError(str(e)) from None

    @observe("web_time_zone")
    def _web_time_zone_changed(self, change) -> None:
        weblinks.set_web_time_zone(change["new"])  # the servers get it with their next link

    @validate("start_from")
    def _check_start_from(self, proposal) -> str:
        """A checkpoint that new servers cannot start from is refused before it is set (the old value stays)."""
        from .errors import DhvmError

        name = proposal["value"]
        if name:
            try:
                (self.sessions.get(MAIN) or self._new_session(start_from=None)).check_start_from(name)
            except DhvmError as e:
                raise TraitError(str(e)) from None
        return name

    @observe("snapshot")
    def _snapshot_set(self, change) -> None:
        """The old name: set, it sets start_from (and is checked there)."""
        print(f"dhvm: Dhvm.snapshot is the old name of Dhvm.start_from: %config Dhvm.start_from = {change['new']!r}",
              file=sys.stderr)
        self.start_from = change["new"]

    @observe("mode", "pool_size", "start_from", "memory_headroom_mb")
    def _mode_changed(self, change) -> None:
        for session in self.sessions.values():
            if change["name"] == "memory_headroom_mb":
                session.memory_headroom_mb = change["new"]
            elif change["name"] == "mode":
                session.set_mode(change["new"])
            elif change["name"] == "start_from":
                session.set_start_from(change["new"] or None)
            else:
                session.set_pool_size(change["new"])

    def __init__(self, shell=None, **kwargs):
        # Made before traitlets' config is applied: a configured start_from is checked against a session.
        self.sessions = Sessions(self._new_session)
        """The notebook's sessions by name: ``main`` (cells without -s) and the named ones (``-s NAME``, forks);
        the kernel finds them here too."""
        super().__init__(shell=shell, **kwargs)

    # -- the session ---------------------------------------------------------------------------

    @property
    def session(self) -> Session:
        """The session the running command or cell is for (``-s NAME``; else ``main``), made on first use."""
        return self.sessions.current

    def _new_session(self, **overrides) -> Session:
        # Only what the user set: an unset heap must not make status report a mismatch nobody asked for.
        options = {**({"heap": self.heap} if self.heap else {}), **({"network": True} if self.network else {}),
                   **({"start_from": self.start_from} if self.start_from else {})}
        session = Session(self.backend, self.config_dir or None, mode=self.mode, pool_size=self.pool_size,
                          **{**options, **overrides})
        session.memory_headroom_mb = self.memory_headroom_mb
        return session

    def close(self) -> None:
        """Destroy every session's VM."""
        self.sessions.close()

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
    @argument("--no-live", action="store_true", help="Show ticking tables as a snapshot, not a live view.")
    @argument("--per-cell", action="store_true",
              help="Run this cell in a fresh server that is destroyed afterwards (Dhvm.mode for every cell).")
    @argument("-s", "--session", default=None, metavar="NAME",
              help="Run the cell in the named session NAME (made on first use; %%dhvm sessions lists them). "
                   "On a line command, which session it is for: %%dhvm -s NAME tables.")
    @argument("command", nargs="*",
              help="Line magic only: status | tables | stats | fetch NAME [--to FILE [--force]] | show NAME [-n N] [--head] [--rate R] | "
                   "live [stop [NAME]] | ide [NAME] | reset | stop | checkpoint NAME [--overwrite] | checkpoints | "
                   "restore NAME | sessions | fork NEW, or code to run.")
    @line_cell_magic
    def dhvm(self, line: str, cell: str | None = None):
        """Run the cell in a Deephaven server inside a microVM; tables come back as DataFrames.

        Line magic: ``%dhvm status``, ``%dhvm tables``, ``%dhvm stats``, ``%dhvm fetch NAME`` (``--to FILE``:
        the whole table into a parquet, CSV or Arrow file),
        ``%dhvm show NAME`` (a live view of a table), ``%dhvm live`` (the live views; ``live stop
        [NAME]`` ends them), ``%dhvm ide [NAME]`` (the web UI: the console, or a table or figure),
        ``%dhvm reset`` (a fresh server), ``%dhvm stop``; ``%dhvm checkpoint NAME`` (save the session's
        server, which runs on), ``%dhvm checkpoints``, ``%dhvm restore NAME`` (a server restored from
        it), ``%dhvm sessions`` (the notebook's sessions), ``%dhvm fork NEW`` (session NEW, started from
        this one's state); ``-s NAME`` first picks the session; anything else is run as code.
        """
        if cell is None:
            words = line.split()
            if words[:1] in (["-s"], ["--session"]):
                if len(words) < 3:
                    raise UsageError("usage: %dhvm -s SESSION COMMAND (e.g. %dhvm -s b tables)")
                self.sessions.require(words[1])
                with self.sessions.using(words[1]):
                    return self.dhvm(line.split(None, 2)[2])
            if words and words[0] in commands.COMMANDS:
                try:
                    words = shlex.split(line)  # a quoted path may hold spaces: --to "my data.parquet"
                except ValueError as e:
                    raise UsageError(f"%dhvm {words[0]}: {e} (close the quote)") from None
                return commands.run(self, words)
            if not line.strip():
                return commands.run(self, ["status"])
            return self._run(line, parse_argstring(self.dhvm, ""))
        args = parse_argstring(self.dhvm, line)
        if args.session:
            with self.sessions.using(args.session):
                return self._run(cell, args)
        return self._run(cell, args)

    def _live_for(self, t: TableResult | DisplayOutput) -> bool:
        """Show ticking table ``t`` (a cell's result), or a ticking figure's display, as a live view, if
        live views are on."""
        session = self.sessions.get(self.sessions.active)
        if not self.live or session is None or session.mode != "per-session":
            return False
        if isinstance(t, TableResult) and not t.refreshing:
            return False
        return self._start_live(t, rows=self.live_rows, head=False, rate=self.live_rate)

    def _start_live(self, first: TableResult | DisplayOutput, rows: int, head: bool, rate: float) -> bool:
        # Only a kernel's frontend updates an output in place; a terminal would print every update anew.
        if getattr(self.shell, "kernel", None) is None:
            return False
        view = live_view(first, rows, head, rate)
        self.session.watch(view.watch, view.update, view.end, rows=rows, head=head, rate=view.rate,
                           dtype_backend=self.dtype_backend)
        return True

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
        live_off = args.no_live or args.per_cell
        timeout = args.timeout if args.timeout is not None else self.timeout
        # A backend that cannot start raises a DhvmError: IPython shows its message, the kernel lives on.
        if not args.per_cell:
            self._start_with_notice()
        result = self.session.execute(
            code, report.files, max_rows=max_rows if max_rows > 0 else None, timeout=timeout or None,
            dtype_backend=self.dtype_backend, on_stdout=_writer(sys.stdout), on_stderr=_writer(sys.stderr),
            # -o means "give me the table": the display limit does not cut it.
            full_tables=[remote for _, remote in outputs], mode="per-cell" if args.per_cell else None,
            on_display=lambda out: show_display(out, live=None if live_off else self._live_for), inputs=inputs,
            execution_count=self.shell.displayhook.prompt_count if self.shell is not None else None)
        if self.session.notice:
            print(self.session.notice, file=sys.stderr)
            self.session.notice = None
        result.files_skipped = report.skipped
        if self.shell is not None:
            self.shell.user_ns["_dhvm"] = result
            self._bind_outputs(result, outputs)
        show_in_ipython(result, quiet=args.quiet, verbose=args.verbose or self.verbose,
                        live=None if live_off else self._live_for)
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
    # The stream class's own write: IPython 9 wraps the instance's during a cell to keep a copy of every
    # write (history_manager.outputs, unbounded: a VM cell printing 200 MB kept 200 MB in the kernel).
    # CellResult keeps a bounded tail of the VM's output instead.
    if "write" in getattr(stream, "__dict__", {}) and hasattr(type(stream), "write"):
        return type(stream).write.__get__(stream)
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
