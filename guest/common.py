"""What every part of the guest agent shares: its log line, request timings, sends that may fail, and
its end of a host connection."""

from __future__ import annotations

import sys
import threading
import time

from .. import protocol as P


def log(msg: str) -> None:
    """A line in the agent's log (the instance's agent.log, or the VM's console)."""
    print(f"[dhg-agent {time.strftime('%H:%M:%S')}] {msg}", file=sys.__stderr__, flush=True)


def ms(t0: float) -> float:
    """Milliseconds since ``t0`` (a ``time.perf_counter()`` reading), as replies report timings."""
    return round((time.perf_counter() - t0) * 1000, 3)


def safe_send(conn: "P.FrameStream | Replies", header: dict, payloads=()) -> None:
    """Send a frame; if the host is gone there is nobody to tell, and the work goes on."""
    try:
        conn.send(header, payloads)
    except OSError:
        pass


class HostLink:
    """The agent's end of one connection to a host.

    A checkpoint holds it still: ``hold`` returns once no frame is half sent, and until ``release`` no
    frame goes out but the hold's own answer, so the saved VM has nothing in flight. A VM restored from
    a checkpoint (or the base snapshot) keeps the link to the host that was connected when it was saved;
    the restore's handshake makes it a new host's (``new_host``), and the frames still owed to the old
    host's requests are then dropped instead of reaching a host that never asked for them.
    """

    def __init__(self, stream: P.FrameStream):
        self.stream = stream
        self.host = 0
        """Which host this is (counts restores): the requests of an earlier host get no more frames."""
        self.reader: threading.Thread | None = None
        """The thread reading this link: its own answers (cancel, stats, resume) never wait for a release."""
        self._gate = threading.Condition()
        self._open = True
        self._sending = 0

    def recv(self) -> P.Frame:
        return self.stream.recv()

    def close(self) -> None:
        self.stream.close()

    def replies(self) -> "Replies":
        """Where the frames answering a request that arrives now go."""
        return Replies(self, self.host)

    def send(self, host: int, header: dict, payloads=()) -> None:
        with self._gate:
            if threading.current_thread() is not self.reader:
                self._gate.wait_for(lambda: self._open)
            if host != self.host:
                return  # owed to a host that is gone: the VM was restored from a snapshot since
            self._sending += 1
        try:
            self.stream.send(header, payloads)
        finally:
            with self._gate:
                self._sending -= 1
                self._gate.notify_all()

    def hold(self, answer: dict) -> None:
        """Stop every sender, wait for the frame being sent to finish, then send ``answer`` (the last frame)."""
        with self._gate:
            self._open = False
            self._gate.wait_for(lambda: self._sending == 0)
        self.stream.send(answer)

    def release(self, new_host: bool = False) -> None:
        """Let frames go out again (to a new host: the old host's requests get nothing more)."""
        with self._gate:
            if new_host:
                self.host += 1
            self._open = True
            self._gate.notify_all()


class Replies:
    """The frames answering one request: they go to the host that asked, if it is still the link's."""

    def __init__(self, link: HostLink, host: int):
        self.link = link
        self.host = host

    def send(self, header: dict, payloads=()) -> None:
        self.link.send(self.host, header, payloads)
