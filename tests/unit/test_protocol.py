"""The wire protocol: round trips, and malformed or oversized frames that must not crash or hang."""

from __future__ import annotations

import json
import socket
import struct
import threading

import pytest

from dhg_kernel import protocol as P


def pair(**kw):
    a, b = socket.socketpair()
    return P.FrameStream(a, **kw), P.FrameStream(b, **kw)


def test_round_trip_with_binary_payloads():
    a, b = pair()
    blob = bytes(range(256)) * 1000
    t = threading.Thread(target=a.send, args=({"op": "exec", "id": 7, "code": "x = 1"}, [b"", blob, b"\x00\xff"]))
    t.start()
    f = b.recv(timeout=5)
    t.join()
    assert f.header == {"op": "exec", "id": 7, "code": "x = 1"}
    assert [bytes(p) for p in f.payloads] == [b"", blob, b"\x00\xff"]


def test_frame_without_payloads_has_no_payload_section():
    head = json.dumps({"op": "hello"}, separators=(",", ":")).encode()
    wire = b"".join(bytes(x) for x in P.encode({"op": "hello"}))
    assert wire == P.MAGIC + struct.pack(">IH", len(head), 0) + head
    assert P.decode_bytes(wire).payloads == []


def test_payloads_are_raw_bytes_not_base64():
    wire = b"".join(bytes(x) for x in P.encode({"op": "exec"}, [b"\x00\x01rawbytes\xfe"]))
    assert wire.endswith(b"\x00\x01rawbytes\xfe")


def test_many_frames_in_order_from_two_threads():
    a, b = pair()
    n = 200

    def sender(tag):
        for i in range(n):
            a.send({"tag": tag, "i": i}, [bytes([i % 256]) * (i * 10)])

    threads = [threading.Thread(target=sender, args=(t,)) for t in "xy"]
    for t in threads:
        t.start()
    seen = {"x": [], "y": []}
    for _ in range(2 * n):
        f = b.recv(timeout=5)
        i = f.header["i"]
        assert bytes(f.payloads[0]) == bytes([i % 256]) * (i * 10)
        seen[f.header["tag"]].append(i)
    for t in threads:
        t.join()
    assert seen == {"x": list(range(n)), "y": list(range(n))}


def test_bad_magic_is_an_unrecoverable_protocol_error():
    a, b = socket.socketpair()
    a.sendall(b"GET / HTTP/1.1\r\n\r\n")
    with pytest.raises(P.ProtocolError) as e:
        P.FrameStream(b).recv(timeout=5)
    assert not e.value.recoverable and "magic" in str(e.value)


def test_bad_json_header_is_recoverable_and_the_next_frame_reads():
    a, b = socket.socketpair()
    junk = b"{not json"
    a.sendall(P.MAGIC + struct.pack(">IH", len(junk), 0) + junk)
    a.sendall(b"".join(bytes(x) for x in P.encode({"op": "hello"})))
    s = P.FrameStream(b)
    with pytest.raises(P.ProtocolError) as e:
        s.recv(timeout=5)
    assert e.value.recoverable
    assert s.recv(timeout=5).header == {"op": "hello"}


def test_header_that_is_not_an_object_is_rejected():
    a, b = socket.socketpair()
    head = b"[1,2]"
    a.sendall(P.MAGIC + struct.pack(">IH", len(head), 0) + head)
    with pytest.raises(P.ProtocolError, match="JSON object"):
        P.FrameStream(b).recv(timeout=5)


def test_oversized_frame_is_skipped_and_the_stream_goes_on():
    a, b = pair(max_frame_bytes=1000)
    t = threading.Thread(target=lambda: (a.send({"op": "big"}, [b"x" * 5000]), a.send({"op": "small"})))
    t.start()
    with pytest.raises(P.ProtocolError) as e:
        b.recv(timeout=5)
    assert e.value.recoverable and "over the 1000-byte limit" in str(e.value)
    assert b.recv(timeout=5).header == {"op": "small"}
    t.join()


def test_absurd_header_length_is_refused_without_allocating():
    a, b = socket.socketpair()
    a.sendall(P.MAGIC + struct.pack(">IH", 2**32 - 1, 0))
    with pytest.raises(P.ProtocolError, match="header"):
        P.FrameStream(b).recv(timeout=5)


def test_truncated_frame_reports_a_closed_connection():
    a, b = socket.socketpair()
    wire = b"".join(bytes(x) for x in P.encode({"op": "exec"}, [b"y" * 100]))
    a.sendall(wire[:-10])
    a.close()
    with pytest.raises(P.ConnectionClosed, match="middle of a frame"):
        P.FrameStream(b).recv(timeout=5)


def test_stalled_frame_times_out_instead_of_hanging():
    a, b = socket.socketpair()
    a.sendall(P.MAGIC + struct.pack(">IH", 100, 0) + b"{")
    s = P.FrameStream(b, stall_timeout=0.3)
    with pytest.raises(P.ProtocolError, match="stalled"):
        s.recv()


def test_idle_timeout_leaves_the_stream_intact():
    a, b = pair()
    with pytest.raises(socket.timeout):
        b.recv(timeout=0.05)
    a.send({"op": "later"})
    assert b.recv(timeout=5).header == {"op": "later"}


def test_clean_close_between_frames():
    a, b = pair()
    a.close()
    with pytest.raises(P.ConnectionClosed, match="closed the connection"):
        b.recv(timeout=5)


def test_fd_channel_carries_frames_over_a_pipe_like_device():
    import os

    r, w = os.pipe()
    P.FdChannel(w).sendall(b"".join(bytes(x) for x in P.encode({"op": "x"}, [b"abc"])))
    f = P.FrameStream(P.FdChannel(r)).recv(timeout=5)
    assert f.header == {"op": "x"} and bytes(f.payloads[0]) == b"abc"
