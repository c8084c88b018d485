"""The ``%%dhvm`` cell magic and ``%dhvm`` line magic.

Options are declared with ``magic_arguments`` (so ``%%dhvm?`` prints real help) and take their
defaults from traitlets (so ``%config Dhvm.max_rows = 500`` and IPython profiles work).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
import urllib.parse
from pathlib import Path

from IPython.core.magic import Magics, line_cell_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring
from traitlets import Bool, Enum, Float, Integer, List, TraitError, Unicode, observe, validate

from . import files as files_mod
from .config import (DATA_EXTENSIONS, DEFAULT_DTYPE_BACKEND, DEFAULT_MAX_PUSH_MB, DEFAULT_MAX_ROWS,
                     DEFAULT_TIMEOUT_S, default_backend, default_mode)
from .display import format_mapping, live_view, show_display, show_in_ipython
from .errors import UsageError
from .live import DEFAULT_LIVE_RATE, DEFAULT_LIVE_ROWS
from .result import CellResult, DisplayOutput, RemoteValue, TableResult
from .session import Session
from .tables import DTYPE_BACKENDS
from . import weblinks
from .protocol import DEFAULT_WEB_TIME_ZONE

# Pixels of an embedded table or figure view (%dhvm ide NAME).
IDE_FRAME_HEIGHT = 420
LINE_COMMANDS = ("status", "tables", "stats", "fetch", "show", "live", "ide", "reset", "stop", "checkpoint",
                 "checkpoints", "restore", "sessions", "fork")
MAIN_SESSION = "main"


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
    snapshot = Unicode(os.environ.get("DHG_SNAPSHOT", ""), help="A checkpoint (dhvm checkpoint list) that every new "
                       "server starts from, per-cell and warm-pool VMs too; empty: the base snapshot. "
                       "Default: $DHG_SNAPSHOT.").tag(config=True)
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

    @validate("snapshot")
    def _check_snapshot(self, proposal) -> str:
        """A checkpoint that new servers cannot start from is refused before it is set (the old value stays)."""
        from .errors import DhvmError

        name = proposal["value"]
        if name:
            try:
                (self._sessions.get(MAIN_SESSION) or self._new_session(snapshot=None)).check_snapshot(name)
            except DhvmError as e:
                raise TraitError(str(e)) from None
        return name

    @observe("mode", "pool_size", "snapshot", "memory_headroom_mb")
    def _mode_changed(self, change) -> None:
        for session in self._sessions.values():
            if change["name"] == "memory_headroom_mb":
                session.memory_headroom_mb = change["new"]
            elif change["name"] == "mode":
                session.set_mode(change["new"])
            elif change["name"] == "snapshot":
                session.set_snapshot(change["new"] or None)
            else:
                session.set_pool_size(change["new"])

    def __init__(self, shell=None, **kwargs):
        super().__init__(shell=shell, **kwargs)
        self._sessions: dict[str, Session] = {}
        """The notebook's sessions by name: ``main`` (cells without -s) and the named ones (``-s NAME``, forks)."""
        self._active = MAIN_SESSION

    # -- the session ---------------------------------------------------------------------------

    @property
    def _session(self) -> Session | None:
        """The main session, if made yet."""
        return self._sessions.get(MAIN_SESSION)

    @property
    def session(self) -> Session:
        """The session the running command or cell is for (``-s NAME``; else ``main``), made on first use."""
        return self._named(self._active)

    def _named(self, name: str) -> Session:
        if name not in self._sessions:
            self._sessions[name] = self._new_session()
        return self._sessions[name]

    def existing_session(self, name: str | None) -> Session | None:
        """The session called ``name`` (None: main, made on first use), or None if there is no such one."""
        if name in (None, MAIN_SESSION):
            return self._named(MAIN_SESSION)
        return self._sessions.get(name)

    def _new_session(self, **overrides) -> Session:
        # Only what the user set: an unset heap must not make status report a mismatch nobody asked for.
        snapshot = self.snapshot
        options = {**({"heap": self.heap} if self.heap else {}), **({"network": True} if self.network else {}),
                   **({"snapshot": snapshot} if snapshot else {})}
        session = Session(self.backend, self.config_dir or None, mode=self.mode, pool_size=self.pool_size,
                          **{**options, **overrides})
        session.memory_headroom_mb = self.memory_headroom_mb
        return session

    def close(self) -> None:
        """Destroy every session's VM."""
        sessions, self._sessions = list(self._sessions.values()), {}
        for session in sessions:
            session.stop()

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
                name = words[1]
                if name != MAIN_SESSION and name not in self._sessions:
                    # A line command asks about a session; only a cell (%%dhvm -s NAME) makes one.
                    known = ", ".join(self._sessions) or "none yet"
                    raise UsageError(f"no session named {name!r} in this notebook (sessions: {known}). A cell makes "
                                     f"one: %%dhvm -s {name}, and %dhvm fork {name} makes one from this session")
                return self._in_session(name, lambda: self.dhvm(line.split(None, 2)[2]))
            if words and words[0] in LINE_COMMANDS:
                try:
                    words = shlex.split(line)  # a quoted path may hold spaces: --to "my data.parquet"
                except ValueError as e:
                    raise UsageError(f"%dhvm {words[0]}: {e} (close the quote)") from None
                return self._line_command(words)
            if not line.strip():
                return self._line_command(["status"])
            return self._run(line, parse_argstring(self.dhvm, ""))
        args = parse_argstring(self.dhvm, line)
        if args.session:
            return self._in_session(args.session, lambda: self._run(cell, args))
        return self._run(cell, args)

    def _in_session(self, name: str, work):
        """Run ``work`` with the named session as ``session`` (made on first use)."""
        from .vm.checkpoint_store import check_name

        if name != MAIN_SESSION:
            check_name(name, "session")  # a session name follows the rules of checkpoint names
        outer, self._active = self._active, name
        try:
            return work()
        finally:
            self._active = outer

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
            return self._fetch(rest)
        if cmd == "show":
            return self._show_live(rest)
        if cmd == "live":
            if rest[:1] == ["stop"] and len(rest) <= 2:
                n = self.session.stop_live(rest[1] if len(rest) == 2 else None, reason="stopped by %dhvm live stop")
                print(f"dhvm: {n} live view{'s' if n != 1 else ''} stopped.")
                return None
            if rest:
                raise UsageError("usage: %dhvm live (list the live views) | %dhvm live stop [NAME]")
            import pandas as pd

            rows = [{"table": f.name, "updates": f.updates,
                     "rows": f.last.table.rows if f.last and f.last.table else None,
                     "last update": f.last.updated if f.last else None} for f in self.session.live_views()]
            return pd.DataFrame(rows, columns=["table", "updates", "rows", "last update"])
        if cmd == "ide":
            if len(rest) > 1:
                raise UsageError("usage: %dhvm ide [NAME] (a table or figure; no name: the console)")
            return self._show_ide(rest[0] if rest else None)
        if cmd == "reset":
            self.session.reset()
            print("dhvm: the server was discarded; the next cell starts a fresh one.")
            return None
        if cmd == "stop":
            session = self._sessions.pop(self._active, None)
            if session is not None:
                session.stop()
            print("dhvm: stopped." if self._active == MAIN_SESSION else f"dhvm: session {self._active} stopped.")
            return None
        if cmd in ("checkpoint", "checkpoints", "restore", "sessions", "fork"):
            return self._checkpoint_command(cmd, rest)
        raise UsageError(f"unknown command {cmd!r}; choose one of: {', '.join(LINE_COMMANDS)}")

    def _checkpoint_command(self, cmd: str, rest: list[str]):
        """checkpoint NAME [--overwrite] | checkpoints | restore NAME | sessions | fork NEW."""
        import pandas as pd

        from .vm import checkpoint_store as store

        here = f" (session {self._active})" if self._active != MAIN_SESSION else ""
        if cmd == "checkpoint":
            if len(rest) not in (1, 2) or (len(rest) == 2 and rest[1] != "--overwrite"):
                raise UsageError("usage: %dhvm checkpoint NAME [--overwrite]")
            t0 = time.perf_counter()
            ck = self.session.checkpoint(rest[0], overwrite=len(rest) == 2)
            d = ck.describe()
            print(f"dhvm: checkpoint {ck.name} saved{here} in {time.perf_counter() - t0:.1f} s: "
                  f"{d['size_mb'] / 1024:.2f} GiB on disk, tables: {', '.join(ck.tables) or 'none'}. The session runs on.\n"
                  f"  Start from it: %dhvm restore {ck.name} (this session), %dhvm fork NEW (a second one), or "
                  f"%config Dhvm.snapshot = '{ck.name}' (every new server)")
            return None
        if cmd == "checkpoints":
            if rest:
                raise UsageError("usage: %dhvm checkpoints")
            rows = [c.describe() for c in store.list_all(self.session.layout)]
            cols = ["name", "status", "created", "tables", "size_mb", "backend", "deephaven", "base_snapshot"]
            return pd.DataFrame([{k: r[k] for k in cols} for r in rows], columns=cols)
        if cmd == "restore":
            if len(rest) != 1:
                raise UsageError("usage: %dhvm restore NAME (a checkpoint: %dhvm checkpoints lists them)")
            t0 = time.perf_counter()
            self.session.restore(rest[0])
            print(f"dhvm: this session{here} now runs a server restored from checkpoint {rest[0]} "
                  f"(in {time.perf_counter() - t0:.2f} s); its earlier server was discarded.")
            return None
        if cmd == "sessions":
            if rest:
                raise UsageError("usage: %dhvm sessions")
            rows = [{"session": name, **s.summary()} for name, s in self._sessions.items()]
            cols = ["session", "running", "age_s", "heap_used_mb", "vm_rss_mb", "tables", "started_from", "backend", "mode",
                    "ended"]
            return pd.DataFrame([{k: r.get(k) for k in cols} for r in rows], columns=cols).astype({"tables": "Int64"})
        # fork NEW
        if len(rest) != 1:
            raise UsageError("usage: %dhvm fork NEW (then run cells in it with %%dhvm -s NEW)")
        new = rest[0]
        store.check_name(new, "session")
        if new in self._sessions and self._sessions[new].running:
            raise UsageError(f"a session named {new!r} is already running; stop it first (%dhvm -s {new} stop) "
                             f"or pick another name")
        t0 = time.perf_counter()
        child = self.session.fork(origin=f"fork of {self._active}")
        old = self._sessions.pop(new, None)
        if old is not None:
            old.stop()
        self._sessions[new] = child
        print(f"dhvm: session {new} forked from {self._active} in {time.perf_counter() - t0:.1f} s; both run on. "
              f"Run cells in it with %%dhvm -s {new}")
        return None

    def _fetch(self, words: list[str]):
        """``%dhvm fetch NAME``: its first max_rows rows as a DataFrame. With ``--to FILE [--force] [--format F]
        [-q]``: the whole table streamed into a local parquet, CSV or Arrow file; returns what was written."""
        from .tablefiles import FORMAT_NAMES

        usage = "usage: %dhvm fetch NAME [--to FILE.parquet|.csv|.arrow [--force] [--format F] [-q]]"
        ap = _Parser(prog="%dhvm fetch", add_help=False)
        ap.add_argument("name")
        ap.add_argument("--to", metavar="FILE")
        ap.add_argument("--format", choices=FORMAT_NAMES)
        ap.add_argument("--force", action="store_true")
        ap.add_argument("-q", "--quiet", action="store_true")
        try:
            a = ap.parse_args(words)
        except argparse.ArgumentError as e:
            raise UsageError(f"{e}; {usage}") from None
        if a.to is None:
            if a.format or a.force or a.quiet:
                raise UsageError(f"--format, --force and -q go with --to FILE; {usage}")
            return self.session.fetch(a.name, self.max_rows, self.dtype_backend).df
        return self.session.fetch_to(a.name, a.to, a.format, a.force, progress=False if a.quiet else None)

    def _show_live(self, words: list[str]) -> None:
        """``%dhvm show NAME [-n N] [--head] [--rate R]``: a live view of a table in the session."""
        ap = _Parser(prog="%dhvm show", add_help=False)
        ap.add_argument("name")
        ap.add_argument("-n", "--rows", type=int, default=self.live_rows)
        ap.add_argument("--head", action="store_true")
        ap.add_argument("--rate", type=float, default=self.live_rate)
        try:
            a = ap.parse_args(words)
        except argparse.ArgumentError as e:
            raise UsageError(f"{e}; usage: %dhvm show NAME [-n ROWS] [--head] [--rate UPDATES_PER_S]") from None
        first = self.session.fetch(a.name, a.rows, self.dtype_backend)
        if not self._start_live(first, rows=a.rows, head=a.head, rate=a.rate):
            from .display import show_table

            show_table(first)

    def _live_for(self, t: TableResult | DisplayOutput) -> bool:
        """Show ticking table ``t`` (a cell's result), or a ticking figure's display, as a live view, if
        live views are on."""
        session = self._sessions.get(self._active)
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

    def _show_ide(self, name: str | None) -> None:
        """A one-time link to the server's web UI (and, for a table or figure, the view itself, embedded).
        Links carry no key (weblinks.py): the iframe and the link each get their own, as each opens once."""
        import html

        from IPython.display import display

        from .weblinks import LINK_TTL_S

        url = self.session.ide_url(name)
        what = f"{name} in Deephaven's web UI" if name else "Deephaven's web UI (console)"
        once = (f"the link opens once, within {LINK_TTL_S / 60:.0f} min, for your user only; "
                f"{'%dhvm ide ' + name if name else '%dhvm ide'} makes a new one")
        link = f'<a href="{html.escape(url)}" target="_blank" rel="noopener">Open {html.escape(what)}</a>'
        frame = f'<iframe src="{html.escape(self.session.ide_url(name))}" width="100%" height="{IDE_FRAME_HEIGHT}" ' \
                f'style="border:1px solid #ccc"></iframe>' if name else ""
        note = _remote_browser_note(url, name, self.session.deephaven_address())
        display({"text/plain": f"{what}: {url}\n({once})" + (f"\n{note}" if note else ""),
                 "text/html": link + f" <small>({html.escape(once)})</small>" + (f"<br>{frame}" if frame else "")
                 + (f"<p style='color:#a15c00'>{html.escape(note)}</p>" if note else "")}, raw=True)

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


def _remote_browser_note(url: str, name: str | None, server: tuple[str, int] | None) -> str | None:
    """Under JupyterHub the browser is usually on another machine and cannot reach this host's
    127.0.0.1: say how to get there (the link broker's port and the server's). (Deephaven's web UI does
    not work through jupyter-server-proxy: its pages load under /proxy/PORT/, but its API calls go to
    the server's root; see the README.)"""
    if not os.environ.get("JUPYTERHUB_SERVICE_PREFIX"):
        return None
    from .weblinks import tunnel_args

    port = server[1] if server else urllib.parse.urlsplit(url).port
    return (f"This notebook runs under JupyterHub, so your browser may not reach this machine's 127.0.0.1. "
            f"Tunnel the ports first (ssh {tunnel_args(port)} THIS_HOST), or watch the table here with "
            f"a live view: %dhvm show {name or 'NAME'}")


class _Parser(argparse.ArgumentParser):
    """argparse for a line command: an error is raised (and becomes a UsageError), never an exit."""

    def error(self, message):
        raise argparse.ArgumentError(None, message)


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
