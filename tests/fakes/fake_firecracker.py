"""A stand-in for Firecracker, for the tests that cannot run the real one: its API (routes, bodies and a
small state machine taken from the official spec, validated as strictly as Firecracker does), the
hybrid-vsock peer that Firecracker is to the host, an agent that answers hello and restored, and
executables named ``firecracker`` built on them (``stand_in``) or that only say their version
(``fake_binary``). Used by tests/vm/test_firecracker.py; the stand-in executable imports this module.
"""

from __future__ import annotations

import http.server
import json
import re
import socket
import socketserver
import sys
import threading
from pathlib import Path

from dhg_kernel import protocol as P

# Facts from Firecracker's changelog (docs/design-facts.md, "Firecracker's snapshot API and its version
# gates"): SnapshotLoadParams fields and the release that added them.
LOAD_FIELD_SINCE = {"network_overrides": (1, 12), "track_dirty_pages": (1, 13), "vsock_override": (1, 16),
                    "clock_realtime": (1, 16)}


# -- a Firecracker API server that validates like Firecracker ---------------------------------------


def _strict(schema):
    """The test's own reading of the swagger: objects reject unknown fields (serde deny_unknown_fields)."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items() if k not in ("example", "readOnly")}
        if out.get("type") == "object" and "properties" in out:
            out["additionalProperties"] = False
        return {"$ref": out["$ref"]} if "$ref" in out else out
    return [_strict(v) for v in schema] if isinstance(schema, list) else schema


class SpecServer:
    """Routes, body schemas and a small state machine taken from the spec's ``paths``."""

    def __init__(self, spec_path: Path, version: tuple):
        import yaml

        doc = yaml.safe_load(spec_path.read_text())
        self.version = version
        self.definitions = {k: _strict(v) for k, v in doc["definitions"].items()}
        for field, since in LOAD_FIELD_SINCE.items():
            if version[:2] < since:  # an older Firecracker does not know these fields at all
                self.definitions["SnapshotLoadParams"]["properties"].pop(field, None)
        self.routes = []
        for template, ops in doc["paths"].items():
            pattern = re.compile("^" + re.sub(r"\{[^}]+\}", "[^/]+", template) + "$")
            for method, op in ops.items():
                body = [p for p in op.get("parameters", []) if p.get("in") == "body"]
                ref = body[0]["schema"]["$ref"].rsplit("/", 1)[-1] if body else None
                self.routes.append((method.upper(), pattern, ref))
        self.calls: list[tuple[str, str, dict | None]] = []
        self.state = "Not started"
        self.configured = False
        self.fail: dict[str, str] = {}  # path -> fault_message to answer with
        self.on_load = None  # callback(body) when a snapshot is loaded

    def handle(self, method: str, path: str, body) -> tuple[int, dict | None]:
        import jsonschema

        route = next((r for r in self.routes if r[0] == method and r[1].match(path)), None)
        if route is None:
            return 400, {"fault_message": f"Invalid request method and/or path: {method} {path}"}
        if method == "GET":
            if path == "/":
                return 200, {"app_name": "Firecracker", "id": "anonymous-instance", "state": self.state,
                             "vmm_version": ".".join(map(str, self.version))}
            if path == "/version":
                return 200, {"firecracker_version": ".".join(map(str, self.version))}
            return 200, {}
        self.calls.append((method, path, body))
        schema = {"$ref": f"#/definitions/{route[2]}", "definitions": self.definitions}
        errors = list(jsonschema.Draft4Validator(schema).iter_errors(body))
        if errors:
            return 400, {"fault_message": f"An error occurred when deserializing the json body of a request: "
                                          f"{errors[0].message}"}
        if path in self.fail:
            return 400, {"fault_message": self.fail[path]}
        if path == "/snapshot/load":
            if self.configured or self.state != "Not started":
                return 400, {"fault_message": "Loading a microVM snapshot not allowed after configuring boot-specific resources."}
            self.state = "Running" if body.get("resume_vm") else "Paused"
            if self.on_load:
                self.on_load(body)
        elif path == "/actions" and body["action_type"] == "InstanceStart":
            self.state = "Running"
        elif path == "/vm":
            if self.state == "Not started":
                return 400, {"fault_message": "The requested operation is not supported before starting the microVM."}
            self.state = "Paused" if body["state"] == "Paused" else "Running"
        elif path == "/snapshot/create":
            if self.state != "Paused":
                return 400, {"fault_message": "Cannot create snapshot: the microVM is not paused."}
            for key in ("snapshot_path", "mem_file_path"):
                Path(body[key]).write_bytes(b"snapshot-" + key.encode())
        elif path != "/logger":
            if self.state != "Not started":
                return 400, {"fault_message": "The requested operation is not supported after starting the microVM."}
            self.configured = True
        return 204, None


def serve_api(server: SpecServer, sock_path: str) -> socketserver.UnixStreamServer:
    """Serve ``server`` over HTTP/1.1 on a unix socket, in a thread."""

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _do(self):
            n = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(n) if n else b""
            try:
                body = json.loads(raw) if raw else None
            except ValueError:
                body = None
            status, reply = server.handle(self.command, self.path, body)
            data = json.dumps(reply).encode() if reply is not None else b""
            self.send_response(status)
            if data:
                self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if data:  # nothing more for an empty reply: the client may have closed on its headers
                self.wfile.write(data)

        do_GET = do_PUT = do_PATCH = _do

        def address_string(self):
            return "unix"

        def log_message(self, *args):
            pass

    class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
        daemon_threads = True

    httpd = Server(sock_path, Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd


# -- a peer that speaks hybrid vsock --------------------------------------------------------------


class HybridVsockPeer:
    """Firecracker's side of hybrid vsock: ``CONNECT <port>\\n`` → ``OK <n>\\n`` and then the guest's
    listener on that port, or a closed connection when nothing listens (yet)."""

    def __init__(self, path: Path):
        self.path = path
        self.listeners: dict[int, callable] = {}
        self.connects: list[int] = []
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(str(path))
        self._sock.listen(16)
        self._next = 1073741824
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self):
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket):
        line = b""
        while not line.endswith(b"\n"):
            ch = conn.recv(1)
            if not ch:
                conn.close()
                return
            line += ch
        m = re.fullmatch(rb"CONNECT (\d+)\n", line)
        port = int(m.group(1)) if m else -1
        self.connects.append(port)
        handler = self.listeners.get(port)
        if handler is None:
            conn.close()  # nothing listens on that guest port
            return
        self._next += 1
        conn.sendall(f"OK {self._next}\n".encode())
        handler(conn)

    def close(self):
        self._sock.close()


def mini_agent(conn: socket.socket):
    """Answers hello and restored like the guest agent does (the real one needs a Deephaven)."""
    stream = P.FrameStream(conn)
    try:
        while True:
            frame = stream.recv()
            h = frame.header
            if h.get("op") == P.OP_HELLO:
                stream.send({"ev": P.EV_DONE, "re": h["id"], "status": "ok", "version": P.PROTOCOL_VERSION,
                             "agent_version": "mini"})
            elif h.get("op") == P.OP_RESTORED:
                stream.send({"ev": P.EV_DONE, "re": h["id"], "status": "ok", "clock_set": True,
                             "entropy_bytes": len(frame.payloads[0])})
    except (P.ConnectionClosed, OSError):
        conn.close()


def echo(conn: socket.socket):
    with conn:
        while data := conn.recv(65536):
            conn.sendall(data)


FAKE_FC = """#!/bin/sh
echo "Firecracker v{v}"
"""


def fake_binary(directory: Path, version: str) -> Path:
    """An executable that answers ``--version`` like Firecracker (enough for the backend's checks)."""
    exe = directory / f"bin-{version}" / "firecracker"
    exe.parent.mkdir()
    exe.write_text(FAKE_FC.format(v=version))
    exe.chmod(0o755)
    return exe


STAND_IN = """#!{python}
# A stand-in for the firecracker binary: the spec-validating API server of tests/fakes/fake_firecracker.py on
# --api-sock, and on /snapshot/load a hybrid-vsock peer at the uds path (relative to the cwd, as
# Firecracker binds it) whose port 52 answers like the agent and port 10000 echoes.
import os, sys, time
sys.path.insert(0, {tests!r}); sys.path.insert(0, {root!r})
import fake_firecracker as T
from pathlib import Path
VERSION = tuple(int(x) for x in {version!r}.split("."))
if "--version" in sys.argv:
    print("Firecracker v" + {version!r}); sys.exit(0)
api = sys.argv[sys.argv.index("--api-sock") + 1]
srv = T.SpecServer(Path({spec!r}), VERSION)
srv.fail.update(T.json.loads(os.environ.get("FAKE_FIRECRACKER_FAIL", "{{}}")))  # path -> fault_message
print("stand-in firecracker started", flush=True)  # the guest console, as a real one's boot lines
def on_load(body):
    mem = open(body["mem_backend"]["backend_path"], "rb")  # read-only, as Firecracker maps it MAP_PRIVATE
    srv.mem = mem
    uds = (body.get("vsock_override") or {{}}).get("uds_path", "vsock.sock")
    peer = T.HybridVsockPeer(Path(uds))
    peer.listeners[52] = T.mini_agent
    peer.listeners[10000] = T.echo
    open("calls.json", "w").write(T.json.dumps(srv.calls))
srv.on_load = on_load
T.serve_api(srv, api)
while True:
    time.sleep(3600)
"""


def stand_in(directory: Path, version: str, spec: Path) -> Path:
    """A ``firecracker`` executable that serves ``SpecServer`` (for ``spec``) on its --api-sock and, once a
    snapshot is loaded, a hybrid-vsock peer whose port 52 is ``mini_agent`` and 10000 ``echo``. The
    environment variable FAKE_FIRECRACKER_FAIL (JSON: API path -> fault_message) makes those calls fail."""
    exe = directory / f"fc-{version}" / "firecracker"
    exe.parent.mkdir()
    root = Path(__file__).resolve().parents[2]
    exe.write_text(STAND_IN.format(python=sys.executable, tests=str(Path(__file__).resolve().parent), root=str(root),
                                   version=version, spec=str(spec)))
    exe.chmod(0o755)
    return exe
