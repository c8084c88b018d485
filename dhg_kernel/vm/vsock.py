"""Firecracker's hybrid vsock, host side: connect to a guest port, and forward a guest port to TCP.

Firecracker binds the vsock device's ``uds_path`` itself. A host program connects to it, writes
``CONNECT <port>\\n`` and reads ``OK <hostport>\\n``; from then on the unix socket is a byte stream
to the guest's AF_VSOCK listener on ``<port>``. If nothing listens on that port in the guest,
Firecracker closes the connection instead of answering — which also happens while the guest is
still booting or restoring, so a connect retries until its deadline.
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

from .base import AgentStartError, connect_unix

# The longest handshake reply we accept ("OK 1073741824\n" is 14 bytes).
_MAX_REPLY = 64
# A CONNECT that gets no answer at all within this long is retried (the peer is wedged).
HANDSHAKE_TIMEOUT_S = 2.0
RETRY_PAUSE_S = 0.02
MAX_RETRY_PAUSE_S = 0.25
# Forwarded connections: how long one client may wait for the guest to accept.
FORWARD_CONNECT_TIMEOUT_S = 10.0
_CHUNK = 1 << 16


class VsockNotListening(AgentStartError):
    """The hybrid-vsock socket answered, but nothing in the guest listens on the port."""


def handshake(sock: socket.socket, port: int, timeout: float = HANDSHAKE_TIMEOUT_S) -> int:
    """Ask for guest ``port`` on a connected uds; returns Firecracker's host-side port number.

    Raises VsockNotListening when Firecracker closes the connection (no guest listener).
    """
    sock.settimeout(timeout)
    sock.sendall(f"CONNECT {port}\n".encode())
    reply = b""
    # Byte by byte: whatever follows the newline already belongs to the guest's stream.
    while not reply.endswith(b"\n"):
        try:
            ch = sock.recv(1)
        except (ConnectionResetError, BrokenPipeError):
            ch = b""
        if not ch:
            raise VsockNotListening(f"agent not listening on guest vsock port {port} (the connection was closed)")
        reply += ch
        if len(reply) > _MAX_REPLY:
            raise AgentStartError(f"unexpected hybrid-vsock reply {reply[:_MAX_REPLY]!r}")
    words = reply.decode(errors="replace").split()
    if len(words) != 2 or words[0] != "OK" or not words[1].isdigit():
        raise AgentStartError(f"unexpected hybrid-vsock reply {reply!r} to CONNECT {port}")
    sock.settimeout(None)
    return int(words[1])


def connect(uds_path: Path, port: int, timeout: float, is_alive=lambda: True,
            refused_limit: float | None = None) -> socket.socket:
    """A stream to guest vsock ``port`` through ``uds_path``, retrying until ``timeout`` while the
    socket is missing (Firecracker starting) or nothing listens yet (the guest coming up).

    Tries back off from RETRY_PAUSE_S to MAX_RETRY_PAUSE_S, so a guest that refuses at once is asked
    a few dozen times, not thousands. ``refused_limit``: give up sooner once the guest has refused
    every try for this long. A restored VM's agent was listening when the snapshot was taken, so a
    refusal there means the agent is gone, and waiting out the whole timeout would only hang the cell."""
    start = time.monotonic()
    deadline = start + timeout
    last: Exception | None = None
    tries = 0
    refused_since: float | None = None
    pause = RETRY_PAUSE_S
    while True:
        left = max(deadline - time.monotonic(), 0.05)
        sock = connect_unix(Path(uds_path), left, is_alive)
        tries += 1
        try:
            handshake(sock, port, min(HANDSHAKE_TIMEOUT_S, left))
            return sock
        except (VsockNotListening, socket.timeout, OSError) as e:
            sock.close()
            last = e
        now = time.monotonic()
        if isinstance(last, VsockNotListening):
            refused_since = now if refused_since is None else refused_since
        else:
            refused_since = None
        if not is_alive():
            raise AgentStartError(f"the VM exited before its agent listened on vsock port {port}")
        gave_up = refused_limit is not None and refused_since is not None and now - refused_since >= refused_limit
        if now >= deadline or gave_up:
            if isinstance(last, VsockNotListening):
                raise VsockNotListening(
                    f"agent not listening on guest vsock port {port} via {uds_path}: the guest refused "
                    f"{tries} connection{'s' if tries != 1 else ''} over {now - start:.1f}s, so the agent in the "
                    "VM is not running (its console, below, may say why)") from None
            raise AgentStartError(f"no hybrid-vsock connection to port {port} via {uds_path} within "
                                  f"{timeout:.0f}s ({tries} tries; last: {last or 'no answer'})") from None
        time.sleep(min(pause, max(deadline - now, 0)))
        pause = min(pause * 2, MAX_RETRY_PAUSE_S)


class PortForwarder:
    """Forward 127.0.0.1:<port> on the host to a guest vsock port: one hybrid-vsock connection
    per TCP client, bytes pumped both ways by two threads. No TAP device is involved."""

    def __init__(self, uds_path: Path, guest_port: int, host: str = "127.0.0.1", port: int = 0):
        self.uds_path = Path(uds_path)
        self.guest_port = guest_port
        self._listener = socket.create_server((host, port))
        self.host, self.port = self._listener.getsockname()[:2]
        self._closed = threading.Event()
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._accept_loop, name=f"dhg-fwd-{self.port}", daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), name="dhg-fwd-conn", daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            guest = connect(self.uds_path, self.guest_port, FORWARD_CONNECT_TIMEOUT_S)
        except (AgentStartError, OSError):
            client.close()  # the client sees a closed connection, as with a refused port
            return
        with self._lock:
            if self._closed.is_set():
                client.close()
                guest.close()
                return
            self._conns.update((client, guest))
        t = threading.Thread(target=_pump, args=(guest, client), name="dhg-fwd-out", daemon=True)
        t.start()
        _pump(client, guest)
        t.join()
        with self._lock:
            self._conns.difference_update((client, guest))
        client.close()
        guest.close()

    def close(self) -> None:
        """Stop accepting and cut every forwarded connection."""
        self._closed.set()
        try:
            self._listener.close()
        except OSError:
            pass
        with self._lock:
            conns, self._conns = list(self._conns), set()
        for s in conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def _pump(src: socket.socket, dst: socket.socket) -> None:
    """Copy src -> dst until EOF, then half-close dst so the other side sees the end too."""
    try:
        while True:
            data = src.recv(_CHUNK)
            if not data:
                break
            dst.sendall(data)
    except OSError:
        pass
    try:
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        pass
