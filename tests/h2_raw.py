"""Just enough HTTP/2 to speak to a gRPC server as an abusive client does: connections that
finish the handshake and then idle, streams that give the server no window to send in.
Official clients cannot be made to do either, which is why this exists (tests only)."""

from __future__ import annotations

import socket
import struct
import time

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS = 0, 1, 3, 4
END_STREAM, END_HEADERS, ACK = 0x1, 0x4, 0x1
SETTINGS_INITIAL_WINDOW_SIZE = 4


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return (
        struct.pack(">I", len(payload))[1:]
        + bytes([kind, flags])
        + struct.pack(">I", stream_id)
        + payload
    )


def _hpack_int(n: int, prefix_bits: int) -> bytes:
    top = (1 << prefix_bits) - 1
    if n < top:
        return bytes([n])
    out = [top]
    n -= top
    while n >= 128:
        out.append((n & 127) | 128)
        n >>= 7
    out.append(n)
    return bytes(out)


def _literal(name: str, value: str) -> bytes:
    """A header as an HPACK literal without indexing, no Huffman coding."""
    n, v = name.encode(), value.encode()
    return b"\x00" + _hpack_int(len(n), 7) + n + _hpack_int(len(v), 7) + v


def grpc_call_headers(path: str, metadata: tuple[tuple[str, str], ...] = ()) -> bytes:
    pairs = [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", path),
        (":authority", "127.0.0.1"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
        *metadata,
    ]
    return b"".join(_literal(k, v) for k, v in pairs)


def connect(port: int, *, window: int | None = None) -> socket.socket:
    """A connection that has finished the HTTP/2 handshake (preface, SETTINGS, the ACK of the
    server's). `window`: the stream window it grants the server (0: the server can send no
    message on any stream)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    pairs = [] if window is None else [(SETTINGS_INITIAL_WINDOW_SIZE, window)]
    body = b"".join(struct.pack(">HI", k, v) for k, v in pairs)
    s.sendall(PREFACE + frame(SETTINGS, 0, 0, body) + frame(SETTINGS, ACK, 0))
    return s


def open_unary_stream(s: socket.socket, stream_id: int, path: str, message: bytes) -> None:
    """Starts a call with one request message (a unary request, whatever the response)."""
    s.sendall(
        frame(HEADERS, END_HEADERS, stream_id, grpc_call_headers(path))
        + frame(DATA, END_STREAM, stream_id, b"\x00" + struct.pack(">I", len(message)) + message)
    )


def is_closed_by_peer(s: socket.socket, wait_s: float) -> bool:
    """Whether the server closed the connection within `wait_s` (what it sent meanwhile is
    read and dropped)."""
    deadline = time.monotonic() + wait_s
    try:
        while (left := deadline - time.monotonic()) > 0:
            s.settimeout(left)
            if not s.recv(65536):
                return True
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True
    return False


def server_settings(port: int) -> dict[int, int]:
    """The settings a server opens an HTTP/2 connection with, by identifier (RFC 9113, 6.5.2;
    3 is MAX_CONCURRENT_STREAMS)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(PREFACE + frame(SETTINGS, 0, 0))
        data = b""
        while True:
            while len(data) < 9:
                data += s.recv(65536) or b""
            length = int.from_bytes(data[:3], "big")
            while len(data) < 9 + length:
                data += s.recv(65536) or b""
            kind, flags, payload = data[3], data[4], data[9 : 9 + length]
            data = data[9 + length :]
            if kind == SETTINGS and not flags & ACK:
                return {
                    int.from_bytes(payload[k : k + 2], "big"): int.from_bytes(
                        payload[k + 2 : k + 6], "big"
                    )
                    for k in range(0, len(payload), 6)
                }
