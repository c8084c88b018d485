"""The wire protocol between the host and the guest agent: framed messages over one byte stream.

This module knows frames and nothing about Deephaven, VMs or notebooks; the guest agent and
``session.py`` give the messages meaning. It is imported by both sides (the VM image gets a copy
beside the agent), so it uses only the standard library.

A frame is::

    magic "DHGF" | header_len: u32 | n_payloads: u16 | n_payloads x payload_len: u64
    | header (UTF-8 JSON object) | payloads (raw bytes, back to back)

The JSON header says what the frame means (``op`` for requests, ``ev`` for events); payloads carry
bulk bytes (file contents, Arrow IPC streams) without base64. A frame with no payloads has
``n_payloads = 0`` and no payload section at all.
"""

from __future__ import annotations

import json
import os
import select
import socket
import struct
import threading
from dataclasses import dataclass, field
from typing import Any, Sequence

PROTOCOL_VERSION = 2  # 2: hold and resume (checkpoints)
MAGIC = b"DHGF"
_PREFIX = struct.Struct(">4sIH")
_LEN = struct.Struct(">Q")

MAX_HEADER_BYTES = 8 * 1024 * 1024
# Text travels in headers in pieces of at most this many characters (a long print is several stdout
# events): json.dumps writes at most 12 bytes per character (an astral one as two \uXXXX escapes), so
# a piece stays under half of MAX_HEADER_BYTES whatever the text.
TEXT_CHUNK_CHARS = MAX_HEADER_BYTES // 24
# An error event's text (value, traceback, summary) is clipped to this many characters in all, the
# middle of an over-long part cut with a note: the event always fits, and stays readable.
MAX_ERROR_CHARS = TEXT_CHUNK_CHARS // 2
MAX_PAYLOADS = 4096
DEFAULT_MAX_FRAME_BYTES = 4 * 1024 * 1024 * 1024
# Once a frame has started, the rest must arrive within this many seconds (a stalled peer must
# not hang the reader forever).
DEFAULT_STALL_TIMEOUT = 30.0

# Requests (host -> agent), field "op".
OP_HELLO = "hello"
OP_EXEC = "exec"
OP_CANCEL = "cancel"
OP_TABLES = "tables"
OP_FETCH = "fetch"
OP_STATS = "stats"
OP_COMPLETE = "complete"
OP_INSPECT = "inspect"
OP_RESTORED = "restored"
# A live view of a table (guest/live.py): ``live`` events until cancelled or the table goes.
OP_WATCH = "watch"
# A checkpoint: ``hold`` answers once no frame of the agent's is half sent, and the agent then sends
# nothing until ``resume`` (the VM kept running) or ``restored`` (a VM restored from the checkpoint).
OP_HOLD = "hold"
OP_RESUME = "resume"
# A notice with no reply: the host's wall clock (``now_ns``), so a VM's clock cannot drift away.
OP_CLOCK = "clock"
# Settings of Deephaven's web UI (``time_zone``), which it reads from the server's configuration.
OP_WEB = "web"
# What the web UI shows times in unless told otherwise (as DataFrames do; the web UI's own default is New York).
DEFAULT_WEB_TIME_ZONE = "UTC"

# Events (agent -> host), field "ev". Every event answering a request carries "re": request id.
EV_HELLO = "hello"
EV_STDOUT = "stdout"
EV_STDERR = "stderr"
EV_TABLE = "table"
EV_ERROR = "error"
EV_DONE = "done"
EV_RESULT = "result"
# Rich output of the running cell (guest/rich.py): a MIME bundle (``data``, ``metadata``, ``transient``,
# ``update``; binary values as {"$payload": i}), and a request to clear the cell's output (``wait``).
EV_DISPLAY = "display"
EV_CLEAR = "clear_output"
# In a display event's ``transient``: the scope name of a ticking figure, which a live view can watch.
TRANSIENT_WATCH = "dhvm_watch"
# In a MIME bundle: a Deephaven widget (a Figure) by the variable holding it; the host makes it a link.
MIME_DEEPHAVEN_WIDGET = "application/vnd.dhg.deephaven-widget+json"
# Unsolicited, from the VM's init: the agent process died (``reason``, ``status``, ``oom``); the
# VM's agent stream is dead, whatever request was waiting on it.
EV_AGENT_EXIT = "agent_exit"
# A watched table's latest rows (Arrow IPC payload), row count and update time (``watch``); for a
# watched figure (``kind`` "figure"), its MIME bundle as a JSON payload.
EV_LIVE = "live"
# A fetch with ``stream``: an ``table`` event whose payload is the Arrow schema, then one ``batch``
# event per record batch (each payload one Arrow IPC message), so no side holds the table twice.
EV_BATCH = "batch"


class ProtocolError(Exception):
    """The byte stream did not hold a valid frame.

    ``recoverable`` is True when the frame's bounds were known and skipped, so the stream can be
    read on; False when the stream is out of step and must be closed.
    """

    def __init__(self, message: str, recoverable: bool = False):
        super().__init__(message)
        self.recoverable = recoverable


class HeaderTooLarge(ProtocolError):
    """A frame to send has a header over MAX_HEADER_BYTES (the sender can say what to do instead)."""


class ConnectionClosed(EOFError):
    """The peer closed the stream (cleanly between frames, or in the middle of one)."""


@dataclass
class Frame:
    """One decoded message: its JSON header and its raw payloads."""

    header: dict[str, Any]
    payloads: list[memoryview] = field(default_factory=list)


def inline_payloads(data: dict[str, Any], payloads: Sequence) -> dict[str, Any]:
    """A MIME bundle with its ``{"$payload": i}`` values replaced by base64 text (as Jupyter carries them)."""
    import base64

    out = {}
    for mime, value in data.items():
        if isinstance(value, dict) and set(value) == {"$payload"} and 0 <= value["$payload"] < len(payloads):
            out[mime] = base64.b64encode(payloads[value["$payload"]]).decode("ascii")
        else:
            out[mime] = value
    return out


def encode(header: dict[str, Any], payloads: Sequence[bytes | bytearray | memoryview] = ()) -> list:
    """Encode a frame as a list of buffers to write in order (payloads are not copied)."""
    head = json.dumps(header, separators=(",", ":"), default=str).encode()
    if len(head) > MAX_HEADER_BYTES:
        raise HeaderTooLarge(f"frame header is {len(head)} bytes, over the {MAX_HEADER_BYTES} limit")
    if len(payloads) > MAX_PAYLOADS:
        raise ProtocolError(f"frame has {len(payloads)} payloads, over the {MAX_PAYLOADS} limit")
    sizes = [memoryview(p).nbytes for p in payloads]
    prefix = _PREFIX.pack(MAGIC, len(head), len(sizes)) + b"".join(_LEN.pack(s) for s in sizes)
    return [prefix + head, *payloads]


def decode_bytes(data: bytes) -> Frame:
    """Decode one whole frame held in memory (for tests and tools)."""
    import io

    return FrameReader(io.BytesIO(data)).read()


class _SocketReader:
    """Buffered reads from a socket that survive a timeout: a timed-out recv consumes nothing.

    (``socket.makefile`` cannot be read again after a timeout.)
    """

    def __init__(self, sock: socket.socket):
        self._sock = sock
        self._buf = bytearray()

    def readinto(self, view) -> int:
        if self._buf:
            n = min(len(view), len(self._buf))
            view[:n] = self._buf[:n]
            del self._buf[:n]
            return n
        if len(view) >= 1 << 16:
            return self._sock.recv_into(view)
        data = self._sock.recv(1 << 16)
        n = min(len(view), len(data))
        view[:n] = data[:n]
        self._buf += data[n:]
        return n

    def read(self, n: int) -> bytes:
        buf = bytearray(n)
        k = self.readinto(memoryview(buf))
        return bytes(buf[:k])


class FrameReader:
    """Reads frames from a binary file-like object (e.g. ``socket.makefile('rb')``)."""

    def __init__(self, rfile, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES):
        self._rfile = rfile
        self.max_frame_bytes = max_frame_bytes

    def _read_exact(self, n: int, started: bool, on_start=None) -> memoryview:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            k = self._rfile.readinto(view[got:])
            if not k:
                if got == 0 and not started:
                    raise ConnectionClosed("peer closed the connection")
                raise ConnectionClosed(f"peer closed the connection in the middle of a frame ({got}/{n} bytes)")
            if got == 0 and on_start:
                on_start()
            got += k
        return view

    def _skip(self, n: int) -> None:
        while n > 0:
            chunk = self._rfile.read(min(n, 1 << 20))
            if not chunk:
                raise ConnectionClosed("peer closed the connection while an oversized frame was skipped")
            n -= len(chunk)

    def read(self, on_start=None) -> Frame:
        """Read the next frame. ``on_start`` is called once its first bytes have arrived."""
        prefix = self._read_exact(_PREFIX.size, started=False, on_start=on_start)
        magic, head_len, n_payloads = _PREFIX.unpack(prefix)
        if magic != MAGIC:
            raise ProtocolError(f"bad frame magic {bytes(magic)!r} (expected {MAGIC!r}): not a dhg peer, or out of step")
        if head_len > MAX_HEADER_BYTES:
            raise ProtocolError(f"frame header of {head_len} bytes is over the {MAX_HEADER_BYTES} limit")
        if n_payloads > MAX_PAYLOADS:
            raise ProtocolError(f"frame declares {n_payloads} payloads, over the {MAX_PAYLOADS} limit")
        sizes: list[int] = []
        if n_payloads:
            raw_sizes = self._read_exact(_LEN.size * n_payloads, True)
            sizes = [_LEN.unpack_from(raw_sizes, i * _LEN.size)[0] for i in range(n_payloads)]
        total = head_len + sum(sizes)
        if total > self.max_frame_bytes:
            self._skip(total)
            raise ProtocolError(f"frame of {total} bytes is over the {self.max_frame_bytes}-byte limit", recoverable=True)
        raw_head = self._read_exact(head_len, True)
        payloads = [self._read_exact(s, True) for s in sizes]
        try:
            header = json.loads(bytes(raw_head))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ProtocolError(f"frame header is not valid JSON: {e}", recoverable=True) from None
        if not isinstance(header, dict):
            raise ProtocolError("frame header must be a JSON object", recoverable=True)
        return Frame(header, payloads)


class FdChannel:
    """A socket-like face on a character device (a virtio-serial port), so FrameStream can use it."""

    def __init__(self, fd: int):
        self.fd = fd
        self._timeout: float | None = None

    def settimeout(self, timeout: float | None) -> None:
        self._timeout = timeout

    def recv(self, n: int) -> bytes:
        if self._timeout is not None and not select.select([self.fd], [], [], self._timeout)[0]:
            raise socket.timeout("timed out")
        return os.read(self.fd, n)

    def recv_into(self, view, n: int = 0) -> int:
        data = self.recv(n or len(view))
        view[: len(data)] = data
        return len(data)

    def sendall(self, buf) -> None:
        mv = memoryview(buf).cast("B")
        while mv:
            mv = mv[os.write(self.fd, mv):]

    def shutdown(self, how: int) -> None:
        pass

    def close(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass


class FrameStream:
    """A framed, thread-safe duplex over a connected stream socket.

    ``send`` may be called from several threads; ``recv`` from one reader at a time.
    """

    def __init__(self, sock, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
                 stall_timeout: float = DEFAULT_STALL_TIMEOUT):
        self.sock = sock
        self._reader = FrameReader(_SocketReader(sock), max_frame_bytes)
        self._send_lock = threading.Lock()
        self.stall_timeout = stall_timeout

    def send(self, header: dict[str, Any], payloads: Sequence[bytes | bytearray | memoryview] = ()) -> None:
        """Send one frame."""
        buffers = encode(header, payloads)
        with self._send_lock:
            for buf in buffers:
                self.sock.sendall(buf)

    def recv(self, timeout: float | None = None) -> Frame:
        """Receive one frame; ``timeout`` bounds the wait for its first byte (``socket.timeout``)."""
        self.sock.settimeout(timeout)
        started = []

        def on_start():
            started.append(True)
            self.sock.settimeout(self.stall_timeout)

        try:
            return self._reader.read(on_start=on_start)
        except socket.timeout:
            # A timeout before a frame's first byte leaves the stream intact; a stall inside one does not.
            if started:
                raise ProtocolError(f"peer stalled for {self.stall_timeout:g}s in the middle of a frame") from None
            raise
        finally:
            try:
                self.sock.settimeout(None)
            except OSError:
                pass

    def close(self) -> None:
        """Close both directions; a blocked reader in another thread wakes with ConnectionClosed."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


def text_chunks(text: str, size: int = TEXT_CHUNK_CHARS):
    """``text`` in pieces of at most ``size`` characters (one, however short; none when empty)."""
    for start in range(0, len(text), size):
        yield text[start:start + size]


def clip_text(text: str, limit: int, hint: str = "") -> str:
    """``text`` itself if it has at most ``limit`` characters; else its start and end around a note of
    how much was cut (and ``hint``: where the whole text is)."""
    if len(text) <= limit:
        return text
    keep = max(limit - 120 - len(hint), 0)  # the note is part of the limit: a clipped text is clipped no more
    head = keep * 2 // 3
    tail = keep - head
    cut = len(text) - head - tail
    note = f"\n[... {cut:,} of {len(text):,} characters cut here{'; ' + hint if hint else ''} ...]\n"
    return text[:head] + note + text[len(text) - tail:]


def clip_lines(lines: Sequence[str], limit: int, hint: str = "") -> list[str]:
    """Lines (a traceback) within ``limit`` characters in all: an over-long line clipped in its middle,
    and if there are still too many, the first and last lines kept around a note."""
    lines = [str(line) for line in lines]
    if sum(map(len, lines)) <= limit:
        return lines
    lines = [clip_text(line, limit // 4, hint) for line in lines]
    head: list[str] = []
    tail: list[str] = []
    room = limit // 2 - 100 - len(hint)  # and the note of the lines cut is part of the limit too
    for line in reversed(lines):  # the last lines (the error itself) first, in half the room at most
        if len(line) > room:
            break
        tail.insert(0, line)
        room -= len(line)
    room += limit // 2
    for line in lines[:len(lines) - len(tail)]:
        if len(line) > room:
            break
        head.append(line)
        room -= len(line)
    dropped = len(lines) - len(head) - len(tail)
    if dropped:
        head.append(f"[... {dropped:,} lines cut here{'; ' + hint if hint else ''} ...]\n")
    return head + tail


def error_event(name: str, value: str, traceback: list[str] | None = None, re: int | None = None,
                **extra: Any) -> dict[str, Any]:
    """The header of an error event (used for both cell errors and protocol errors); its text is clipped
    to MAX_ERROR_CHARS, so a huge message still arrives (its start and end)."""
    value = clip_text(str(value), MAX_ERROR_CHARS // 4)
    traceback = clip_lines(traceback or [], MAX_ERROR_CHARS // 2)
    if isinstance(extra.get("summary"), list):
        extra["summary"] = clip_lines(extra["summary"], MAX_ERROR_CHARS // 4)
    header: dict[str, Any] = {"ev": EV_ERROR, "name": name, "value": value, "traceback": traceback}
    if re is not None:
        header["re"] = re
    header.update(extra)
    return header
