"""Links to a session's Deephaven web UI that never carry its login key, and the web UI's settings.

An output holding ``?psk=KEY`` goes to every frontend and into the saved notebook (0644), and the key
lets anyone in. So outputs link to this process's link broker instead: a small HTTP server on
127.0.0.1 whose links each open once, within LINK_TTL_S, and only for a browser of this process's own
uid. Opening one redirects to the real URL with the key, which so reaches only that browser. A used,
expired or foreign link gets a page that says so and names the command that makes a new one.
"""

from __future__ import annotations

import html
import http.server
import os
import secrets
import socket
import sys
import threading
import time
import urllib.parse
import weakref
from dataclasses import dataclass
from typing import Callable

from . import protocol as P
from .errors import AgentRefused, UsageError

# ``Session`` (session.py) and ``Server`` (server.py) in annotations are not imported: session.py imports
# this module (the layers allow no circle, not even for type checkers).

# The auth type Deephaven's clients send for a pre-shared key (the agent's handler answers to it).
PSK_AUTH_TYPE = "io.deephaven.authentication.psk.PskAuthenticationHandler"
# Which view of Deephaven's web UI shows an object, by its class name: tables (``/iframe/table/``),
# Deephaven's Figure and plotly-express's figures (``/iframe/widget/``).
WEB_VIEWS = {"Table": "table", "Figure": "widget", "DeephavenFigure": "widget"}
# How long a link opens (seconds): long enough to click it, short enough that a copy is soon worthless.
LINK_TTL_S = 600.0
# Used and expired links are remembered this long, so their pages can say "used" rather than "unknown".
LINK_MEMORY_S = 86_400.0
LINK_PATH = "/dhvm/open/"


@dataclass
class _Link:
    target: Callable[[], str | None]
    """The real URL with the key, made when the link is opened (None: its server has gone)."""
    remake: str
    """The command that makes a new link to the same place."""
    expires: float
    used: bool = False


class LinkBroker:
    """One-time, short-lived links that redirect to URLs holding a secret (one broker per process)."""

    def __init__(self, host: str = "127.0.0.1"):
        self.uid = os.getuid()
        self._links: dict[str, _Link] = {}
        self._lock = threading.Lock()
        self._server = _Server((host, 0), _Handler)
        self._server.broker = self
        self._thread = threading.Thread(target=self._server.serve_forever, name="dhg-link-broker", daemon=True)
        self._thread.start()

    @property
    def address(self) -> tuple[str, int]:
        return self._server.server_address[:2]

    def mint(self, target: Callable[[], str | None], remake: str, ttl: float = LINK_TTL_S) -> str:
        """A URL that redirects once, within ``ttl`` seconds, to what ``target()`` returns then."""
        token = secrets.token_urlsafe(32)
        now = time.monotonic()
        with self._lock:
            for old in [t for t, link in self._links.items() if link.expires + LINK_MEMORY_S < now]:
                del self._links[old]
            self._links[token] = _Link(target, remake, now + ttl)
        host, port = self.address
        return f"http://{host}:{port}{LINK_PATH}{token}"

    def redeem(self, token: str, uid: int | None) -> tuple[int, str]:
        """(302, the real URL) for a link's first use by this uid in time; else (status, an HTML page)."""
        with self._lock:
            link = self._links.get(token)
            if link is None:
                return 404, _page("This link is not known", "It was not made by this kernel, or the kernel that made "
                                  "it has stopped or restarted. Run <code>%dhvm ide</code> (or <code>%dhvm ide NAME"
                                  "</code>) in the notebook for a new link.")
            # Checked before anything else, so another user can neither use a link nor use it up.
            if uid != self.uid:
                return 403, _page("This link belongs to another user", "Links to a Deephaven session open only for "
                                  "the user who runs its kernel. Nothing was opened.")
            if link.used:
                return 410, _page("This link was already used", "Each link opens the Deephaven web UI once, so a copy "
                                  f"of it (in a saved notebook, say) lets no one in. {_remake(link.remake)}")
            if time.monotonic() > link.expires:
                return 410, _page("This link has expired", f"Links open within {LINK_TTL_S / 60:.0f} minutes of being "
                                  f"made. {_remake(link.remake)}")
            link.used = True
        url = link.target()
        if url is None:
            return 410, _page("This link's Deephaven server has stopped", "The session was reset, stopped or "
                              f"restarted since the link was made. {_remake(link.remake)}")
        return 302, url

    def close(self) -> None:
        """Stop serving and close the socket."""
        self._server.shutdown()
        self._server.server_close()


def _remake(command: str) -> str:
    return f"For a new link, run <code>{html.escape(command)}</code> in the notebook."


def _page(title: str, body_html: str) -> str:
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>dhvm: {html.escape(title)}</title></head>"
            f"<body style='font-family:sans-serif;max-width:40em;margin:3em auto'><h2>{html.escape(title)}</h2>"
            f"<p>{body_html}</p></body></html>")


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    broker: LinkBroker


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        path = urllib.parse.urlsplit(self.path).path
        if path.startswith(LINK_PATH):
            uid = peer_uid(self.client_address[:2], self.server.server_address[:2])
            status, out = self.server.broker.redeem(path[len(LINK_PATH):], uid)
        else:
            status, out = 404, _page("Not a dhvm link", "Run <code>%dhvm ide</code> in the notebook for a link.")
        self.send_response(status)
        # The redirect holds the key: no cache, no referrer may keep it.
        self.send_header("Cache-Control", "no-store")
        self.send_header("Referrer-Policy", "no-referrer")
        if status == 302:
            self.send_header("Location", out)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = out.encode()
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args) -> None:  # noqa: A002 - http.server's signature
        pass  # http.server logs to stderr, which in a kernel is a cell's output


def peer_uid(peer: tuple[str, int], local: tuple[str, int]) -> int | None:
    """The uid owning the client end of a TCP connection on this host's loopback, from /proc/net/tcp
    (None: not found). No library exposes it: psutil maps sockets to pids only for our own processes."""
    def hex_addr(addr: tuple[str, int]) -> str:
        ip = int.from_bytes(socket.inet_aton(addr[0]), sys.byteorder)
        return f"{ip:08X}:{addr[1]:04X}"

    want = (hex_addr(peer), hex_addr(local))
    try:
        with open("/proc/net/tcp") as f:
            next(f)
            for line in f:
                fields = line.split()
                if (fields[1], fields[2]) == want:
                    return int(fields[7])
    except (OSError, ValueError, IndexError, StopIteration):
        return None
    return None


_broker: LinkBroker | None = None
_broker_lock = threading.Lock()


def broker() -> LinkBroker:
    """This process's link broker, started on first use."""
    global _broker
    with _broker_lock:
        if _broker is None:
            _broker = LinkBroker()
        return _broker


# -- a session's server ------------------------------------------------------------------------------


def address_of(srv: Server) -> tuple[str, int] | None:
    """Where the host reaches an agent's Deephaven server (127.0.0.1 and a port)."""
    port = srv.instance.record.info.get("deephaven_port")  # a VM's forwarded port
    if port is None:
        port = (srv.info.get("server") or {}).get("port")  # a local agent's own
    return ("127.0.0.1", int(port)) if port else None


def deephaven_address(session: Session) -> tuple[str, int] | None:
    """Where the host reaches the session's Deephaven server, if running."""
    srv = session.server
    return address_of(srv) if srv is not None else None


def _keyed_url(srv: Server, path: str, query: dict[str, str]) -> str | None:
    """The real URL, with the key: only ever sent as the broker's redirect, never shown."""
    addr = address_of(srv)
    if addr is None:
        return None
    if srv.instance.key:
        query = {**query, "psk": srv.instance.key}
    return f"http://{addr[0]}:{addr[1]}{path}" + (f"?{urllib.parse.urlencode(query)}" if query else "")


def _link(session: Session, srv: Server, path: str, query: dict[str, str], remake: str) -> str:
    """A one-time link to ``path`` on ``srv``'s server, dead once the session runs another server."""
    ref = weakref.ref(session)

    def target() -> str | None:
        s = ref()
        if s is None or s.server is not srv or not srv.instance.alive():
            return None
        return _keyed_url(srv, path, query)

    return broker().mint(target, remake)


def web_kind(session: Session, srv: Server, name: str) -> str:
    """"table" or "widget" (a figure): which web UI view shows the object ``name`` holds, by its
    type as the agent's inspection names it (``prices: deephaven.table.Table``)."""
    if not name.isidentifier():
        raise UsageError(f"{name!r} is not a variable name; write %dhvm ide NAME (or %dhvm ide for the console)")
    found = srv.type_of(name)
    if not found.get("found"):
        raise UsageError(f"there is no table or figure named {name!r} in the session (%dhvm tables lists the "
                         f"tables); %dhvm ide without a name opens the console")
    kind = (found.get("data", {}).get("text/plain", "").splitlines() or [""])[0].partition(": ")[2]
    view = WEB_VIEWS.get(kind.rsplit(".", 1)[-1])
    if view is None:
        raise UsageError(f"{name!r} is a {kind or 'value'}, which Deephaven's web UI does not show; it shows "
                         f"tables and figures. %dhvm ide without a name opens the console")
    return view


def ide_url(session: Session, name: str | None = None) -> str:
    """A one-time link to the server's web UI, logged in: the whole console, or one table or figure
    (Deephaven's ``/iframe/table/`` and ``/iframe/widget/`` views) by the variable holding it. Starts
    the session's server if needed; a name that holds neither is a UsageError."""
    if session.mode == "per-cell":
        raise session._per_cell_note("no server to open")
    with session._lock:
        session.start()
        srv = session.server
        assert srv is not None
        path, query = "/ide/", {}
        if name is not None:
            path = f"/iframe/{web_kind(session, srv, name)}/"
            query["name"] = name
        apply_web_settings(session, srv)
        return _link(session, srv, path, query, f"%dhvm ide {name}" if name else "%dhvm ide")


def console_link(session: Session) -> str | None:
    """A one-time link to the web IDE of the running server (None: none running); starts nothing."""
    srv = session.server
    if srv is None or address_of(srv) is None:
        return None
    apply_web_settings(session, srv)
    return _link(session, srv, "/ide/", {}, "%dhvm ide")


def widget_url(session: Session, name: str) -> str | None:
    """A one-time link to the web UI's view of one widget (a Deephaven Figure) by the variable that holds it."""
    srv = session.server
    if srv is None or address_of(srv) is None:
        return None
    apply_web_settings(session, srv)
    return _link(session, srv, "/iframe/widget/", {"name": name}, f"%dhvm ide {name}")


def widget_links(session: Session, data: dict) -> dict:
    """A bundle naming a Deephaven widget gets a (one-time) link to it in the server's web UI."""
    spec = data.get(P.MIME_DEEPHAVEN_WIDGET)
    name = spec.get("name") if isinstance(spec, dict) else None
    url = widget_url(session, name) if name else None
    if not url:
        return data
    lasts = " (per-cell mode: the server is gone after this cell)" if session.mode == "per-cell" else ""
    once = f"opens once, within {LINK_TTL_S / 60:.0f} min; %dhvm ide {name} makes a new link"
    label = html.escape(f"Deephaven figure {name}: open it in the web UI ({once}){lasts}")
    return {**data, "text/plain": f"Deephaven figure {name}: {url} ({once}){lasts}",
            "text/html": f'<a href="{html.escape(url)}" target="_blank" rel="noopener">{label}</a>'}


def status_fields(session: Session, cluster_host: str | None) -> dict:
    """``%dhvm status``'s web UI lines: a one-time link (never the key), and how to reach it from elsewhere."""
    try:
        link = console_link(session)
    except Exception:  # noqa: BLE001 - status must not fail; the command still works
        link = None
    out = {"web_ide": f"{link} (opens once, within {LINK_TTL_S / 60:.0f} min; %dhvm ide makes a new link)"
           if link else "run %dhvm ide for a link"}
    addr = deephaven_address(session)
    if cluster_host and addr:
        # The server's and the broker's ports are on the kernel host's loopback, not on the browser's machine.
        out["web_ide_from_your_machine"] = f"first run: ssh -N {tunnel_args(addr[1])} {cluster_host} (then open web_ide)"
    return out


def tunnel_args(port: int) -> str:
    """``-L`` options that bring this host's Deephaven port and link broker port to another machine."""
    return " ".join(f"-L {p}:127.0.0.1:{p}" for p in (port, broker().address[1]))


# -- the web UI's settings ----------------------------------------------------------------------------

_web_time_zone = P.DEFAULT_WEB_TIME_ZONE


def set_web_time_zone(zone: str) -> str:
    """The time zone Deephaven's web UI shows times in, for the servers of this process's sessions
    (from their next link on). An unknown zone is a UsageError."""
    global _web_time_zone
    _web_time_zone = check_time_zone(zone)
    return _web_time_zone


def check_time_zone(zone: str) -> str:
    """``zone`` if it is an IANA time zone name (``UTC``, ``America/New_York``), else a UsageError."""
    import zoneinfo

    try:
        zoneinfo.ZoneInfo(zone)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise UsageError(f"{zone!r} is not a time zone name; use an IANA name such as UTC, Europe/London or "
                         f"America/New_York: %config Dhvm.web_time_zone = 'UTC'") from None
    return zone


def apply_web_settings(session: Session, srv: Server) -> None:
    """Give ``srv``'s server the web UI's time zone, if it has another one (once per server and zone)."""
    zone = _web_time_zone
    if srv.web_time_zone == zone:
        return
    try:
        done = srv.web(zone)
    except AgentRefused:  # an agent older than this op: its server keeps its zone, the link still works
        done = {}
    srv.web_time_zone = done.get("time_zone", zone)


def pydeephaven_session(session: Session, **kwargs):
    """A pydeephaven Session on the session's server, logged in with this instance's key."""
    try:
        from pydeephaven import Session as DhSession
    except ImportError:
        raise UsageError("pydeephaven is not installed; run: pip install 'dhg_kernel[client]'") from None

    with session._lock:
        session.start()
        srv = session.server
        assert srv is not None
        host, port = address_of(srv) or ("127.0.0.1", 0)
        return DhSession(host=host, port=port, auth_type=PSK_AUTH_TYPE, auth_token=srv.instance.key or "", **kwargs)
