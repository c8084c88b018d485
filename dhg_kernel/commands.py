"""``%dhvm`` line commands: one table of name → (handler, usage), which dispatches them and lists them
in ``%dhvm help``.

Each handler takes the ``Dhvm`` magic (``m``; not imported here, as magic imports this module) and the
command's words after its name, and returns what the line magic returns (a DataFrame, or None after
printing). Errors are UsageErrors, which IPython shows as their message alone.
"""

from __future__ import annotations

import argparse
import os
import time
import urllib.parse
from dataclasses import dataclass
from typing import Callable

from .display import format_mapping
from .errors import UsageError
from .registry import MAIN

# Pixels of an embedded table or figure view (%dhvm ide NAME).
IDE_FRAME_HEIGHT = 420


@dataclass(frozen=True)
class Command:
    run: Callable[..., object]
    args: str
    """Its arguments (``%dhvm help``)."""
    does: str
    """What it does, a few words."""


def _no_args(words: list[str], usage: str) -> None:
    if words:
        raise UsageError(f"usage: {usage}")


def status(m, words: list[str]) -> None:
    _no_args(words, "%dhvm status")
    print(format_mapping(m.session.status()))


def tables(m, words: list[str]):
    import pandas as pd

    _no_args(words, "%dhvm tables")
    rows = [{"name": t["name"], "rows": t["rows"], "columns": len(t["columns"]), "refreshing": t["refreshing"]}
            for t in m.session.tables()]
    return pd.DataFrame(rows, columns=["name", "rows", "columns", "refreshing"])


def stats(m, words: list[str]) -> None:
    _no_args(words, "%dhvm stats")
    print(format_mapping(m.session.stats()))


def live(m, words: list[str]):
    if words[:1] == ["stop"] and len(words) <= 2:
        n = m.session.stop_live(words[1] if len(words) == 2 else None, reason="stopped by %dhvm live stop")
        print(f"dhvm: {n} live view{'s' if n != 1 else ''} stopped.")
        return None
    if words:
        raise UsageError("usage: %dhvm live (list the live views) | %dhvm live stop [NAME]")
    import pandas as pd

    rows = [{"table": f.name, "updates": f.updates, "rows": f.last.table.rows if f.last and f.last.table else None,
             "last update": f.last.updated if f.last else None} for f in m.session.live_views()]
    return pd.DataFrame(rows, columns=["table", "updates", "rows", "last update"])


def ide(m, words: list[str]) -> None:
    if len(words) > 1:
        raise UsageError("usage: %dhvm ide [NAME] (a table or figure; no name: the console)")
    _show_ide(m, words[0] if words else None)


def reset(m, words: list[str]) -> None:
    _no_args(words, "%dhvm reset")
    m.session.reset()
    print("dhvm: the server was discarded; the next cell starts a fresh one.")


def stop(m, words: list[str]) -> None:
    _no_args(words, "%dhvm stop")
    active = m.sessions.active
    m.sessions.stop(active)
    print("dhvm: stopped." if active == MAIN else f"dhvm: session {active} stopped.")


def _here(m) -> str:
    return f" (session {m.sessions.active})" if m.sessions.active != MAIN else ""


def checkpoint(m, words: list[str]) -> None:
    if len(words) not in (1, 2) or (len(words) == 2 and words[1] != "--overwrite"):
        raise UsageError("usage: %dhvm checkpoint NAME [--overwrite]")
    t0 = time.perf_counter()
    ck = m.session.checkpoint(words[0], overwrite=len(words) == 2)
    d = ck.describe()
    print(f"dhvm: checkpoint {ck.name} saved{_here(m)} in {time.perf_counter() - t0:.1f} s: "
          f"{d['size_mb'] / 1024:.2f} GiB on disk, tables: {', '.join(ck.tables) or 'none'}. The session runs on.\n"
          f"  Start from it: %dhvm restore {ck.name} (this session), %dhvm fork NEW (a second one), or "
          f"%config Dhvm.start_from = '{ck.name}' (every new server)")


def checkpoints(m, words: list[str]):
    import pandas as pd

    from .vm import checkpoint_store as store

    _no_args(words, "%dhvm checkpoints")
    rows = [c.describe() for c in store.list_all(m.session.layout)]
    cols = ["name", "status", "created", "tables", "size_mb", "backend", "deephaven", "base_snapshot"]
    return pd.DataFrame([{k: r[k] for k in cols} for r in rows], columns=cols)


def restore(m, words: list[str]) -> None:
    if len(words) != 1:
        raise UsageError("usage: %dhvm restore NAME (a checkpoint: %dhvm checkpoints lists them)")
    t0 = time.perf_counter()
    m.session.restore(words[0])
    print(f"dhvm: this session{_here(m)} now runs a server restored from checkpoint {words[0]} "
          f"(in {time.perf_counter() - t0:.2f} s); its earlier server was discarded.")


def sessions(m, words: list[str]):
    import pandas as pd

    _no_args(words, "%dhvm sessions")
    rows = [{"session": name, **s.summary()} for name, s in m.sessions.items()]
    cols = ["session", "running", "age_s", "heap_used_mb", "vm_rss_mb", "tables", "started_from", "backend", "mode",
            "ended"]
    return pd.DataFrame([{k: r.get(k) for k in cols} for r in rows], columns=cols).astype({"tables": "Int64"})


def fork(m, words: list[str]) -> None:
    from .vm import checkpoint_store as store

    if len(words) != 1:
        raise UsageError("usage: %dhvm fork NEW (then run cells in it with %%dhvm -s NEW)")
    new, active = words[0], m.sessions.active
    store.check_name(new, "session")
    if new in m.sessions and m.sessions.get(new).running:
        raise UsageError(f"a session named {new!r} is already running; stop it first (%dhvm -s {new} stop) "
                         f"or pick another name")
    t0 = time.perf_counter()
    m.sessions.put(new, m.session.fork(origin=f"fork of {active}"))
    print(f"dhvm: session {new} forked from {active} in {time.perf_counter() - t0:.1f} s; both run on. "
          f"Run cells in it with %%dhvm -s {new}")


def fetch(m, words: list[str]):
    """``fetch NAME``: its first max_rows rows as a DataFrame. With ``--to FILE [--force] [--format F] [-q]``:
    the whole table streamed into a local parquet, CSV or Arrow file; returns what was written."""
    from .tablefiles import FORMAT_NAMES

    usage = "usage: %dhvm fetch NAME [--to FILE.parquet|.csv|.arrow [--force] [--format F] [-q]]"
    ap = _Parser(prog="%dhvm fetch", add_help=False)
    ap.add_argument("name")
    ap.add_argument("--to", metavar="FILE")
    ap.add_argument("--format", choices=FORMAT_NAMES)
    ap.add_argument("--force", action="store_true")
    ap.add_argument("-q", "--quiet", action="store_true")
    a = ap.parse(words, usage)
    if a.to is None:
        if a.format or a.force or a.quiet:
            raise UsageError(f"--format, --force and -q go with --to FILE; {usage}")
        return m.session.fetch(a.name, m.max_rows, m.dtype_backend).df
    return m.session.fetch_to(a.name, a.to, a.format, a.force, progress=False if a.quiet else None)


def show(m, words: list[str]) -> None:
    """``show NAME [-n N] [--head] [--rate R]``: a live view of a table in the session."""
    ap = _Parser(prog="%dhvm show", add_help=False)
    ap.add_argument("name")
    ap.add_argument("-n", "--rows", type=int, default=m.live_rows)
    ap.add_argument("--head", action="store_true")
    ap.add_argument("--rate", type=float, default=m.live_rate)
    a = ap.parse(words, "usage: %dhvm show NAME [-n ROWS] [--head] [--rate UPDATES_PER_S]")
    first = m.session.fetch(a.name, a.rows, m.dtype_backend)
    if not m._start_live(first, rows=a.rows, head=a.head, rate=a.rate):
        from .display import show_table

        show_table(first)


def _show_ide(m, name: str | None) -> None:
    """A one-time link to the server's web UI (and, for a table or figure, the view itself, embedded).
    Links carry no key (weblinks.py): the iframe and the link each get their own, as each opens once."""
    import html

    from IPython.display import display

    from .weblinks import LINK_TTL_S

    url = m.session.ide_url(name)
    what = f"{name} in Deephaven's web UI" if name else "Deephaven's web UI (console)"
    once = (f"the link opens once, within {LINK_TTL_S / 60:.0f} min, for your user only; "
            f"{'%dhvm ide ' + name if name else '%dhvm ide'} makes a new one")
    link = f'<a href="{html.escape(url)}" target="_blank" rel="noopener">Open {html.escape(what)}</a>'
    frame = f'<iframe src="{html.escape(m.session.ide_url(name))}" width="100%" height="{IDE_FRAME_HEIGHT}" ' \
            f'style="border:1px solid #ccc"></iframe>' if name else ""
    note = _remote_browser_note(url, name, m.session.deephaven_address())
    display({"text/plain": f"{what}: {url}\n({once})" + (f"\n{note}" if note else ""),
             "text/html": link + f" <small>({html.escape(once)})</small>" + (f"<br>{frame}" if frame else "")
             + (f"<p style='color:#a15c00'>{html.escape(note)}</p>" if note else "")}, raw=True)


def _remote_browser_note(url: str, name: str | None, server: tuple[str, int] | None) -> str | None:
    """Under JupyterHub the browser is usually on another machine and cannot reach this host's
    127.0.0.1: say how to get there (the link broker's port and the server's). (Deephaven's web UI does
    not work through jupyter-server-proxy: its pages load under /proxy/PORT/, but its API calls go to
    the server's root; see docs/usage.md.)"""
    if not os.environ.get("JUPYTERHUB_SERVICE_PREFIX"):
        return None
    from .weblinks import tunnel_args

    port = server[1] if server else urllib.parse.urlsplit(url).port
    return (f"This notebook runs under JupyterHub, so your browser may not reach this machine's 127.0.0.1. "
            f"Tunnel the ports first (ssh {tunnel_args(port)} THIS_HOST), or watch the table here with "
            f"a live view: %dhvm show {name or 'NAME'}")


class _Parser(argparse.ArgumentParser):
    """argparse for a line command: an error becomes a UsageError, never an exit."""

    def error(self, message):
        raise argparse.ArgumentError(None, message)

    def parse(self, words: list[str], usage: str) -> argparse.Namespace:
        try:
            return self.parse_args(words)
        except argparse.ArgumentError as e:
            raise UsageError(f"{e}; {usage}") from None


def help_(m, words: list[str]) -> None:
    _no_args(words, "%dhvm help")
    print("%%dhvm [OPTIONS] runs a cell in the Deephaven server (%%dhvm? lists the options).\n"
          "%dhvm line commands (-s NAME first picks the session; a line that names none is run as code):")
    for name, c in COMMANDS.items():
        print(f"  %dhvm {name} {c.args}".rstrip() + f"\n      {c.does}")


COMMANDS: dict[str, Command] = {
    "status": Command(status, "", "backend, server, what new servers start from, warm pool (starts nothing)"),
    "tables": Command(tables, "", "the session's Deephaven tables"),
    "stats": Command(stats, "", "the agent's statistics: cells run, memory, uptime"),
    "fetch": Command(fetch, "NAME [--to FILE.parquet|.csv|.arrow [--force] [--format F] [-q]]",
                     "a table as a DataFrame, or whole into a file"),
    "show": Command(show, "NAME [-n ROWS] [--head] [--rate R]", "a live view of a table"),
    "live": Command(live, "[stop [NAME]]", "the live views, or end them"),
    "ide": Command(ide, "[NAME]", "Deephaven's web UI (the console, or a table or figure)"),
    "reset": Command(reset, "", "a fresh server for the next cell"),
    "stop": Command(stop, "", "stop the session's server"),
    "checkpoint": Command(checkpoint, "NAME [--overwrite]", "save the session's server (it runs on)"),
    "checkpoints": Command(checkpoints, "", "the saved checkpoints"),
    "restore": Command(restore, "NAME", "a server restored from a checkpoint"),
    "sessions": Command(sessions, "", "the notebook's sessions"),
    "fork": Command(fork, "NEW", "session NEW, started from this one's state"),
    "help": Command(help_, "", "this list"),
}


def run(m, words: list[str]):
    """Run ``%dhvm WORDS``, whose first word names a command (a line that names none is code, run as such)."""
    return COMMANDS[words[0]].run(m, words[1:])
