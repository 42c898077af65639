"""Exact-length socket I/O shared by the store server, its client and the benchmark.

Receiving goes straight into the caller's memory with ``recv_into``; sending joins small
headers into one ``sendall`` and sends large values by themselves, never copying them.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterable
from typing import Any

LARGE = 64 << 10  # buffers at least this large are sent on their own


def set_kernel_timeouts(sock: socket.socket, seconds: float) -> None:
    """Blocking socket whose every send/recv gives up after ``seconds`` (SO_SNDTIMEO/SO_RCVTIMEO).

    Unlike ``settimeout`` (non-blocking socket + poll before each call) this costs one system
    call per receive. A call that times out raises ``BlockingIOError``; treat it as a timeout.
    """
    sock.settimeout(None)
    whole = int(seconds)
    tv = struct.pack("ll", whole, int((seconds - whole) * 1e6))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)


class PeerClosed(ConnectionError):
    """The peer closed the connection before a complete frame arrived."""


def recv_exact_into(sock: socket.socket, view: memoryview, bucket: Any = None) -> None:
    """Fill ``view`` completely from ``sock``; raises :class:`PeerClosed` on EOF.

    With a token ``bucket`` the loop receives about a millisecond of traffic at a time and
    pays for it before reading on, so TCP back-pressure slows the sender like a real link.
    Hot path: allocates only the memoryview slices it walks with.
    """
    if bucket is None:
        while view:
            n = sock.recv_into(view)
            if not n:
                raise PeerClosed("connection closed by peer")
            view = view[n:]
        return
    chunk = bucket.chunk_size()
    while view:
        n = sock.recv_into(view, min(len(view), chunk))
        if not n:
            raise PeerClosed("connection closed by peer")
        bucket.consume(n)
        view = view[n:]


def send_buffers(sock: socket.socket, buffers: Iterable[Any], bucket: Any = None) -> int:
    """Send every buffer in order; returns bytes sent.

    Runs of small buffers (headers, keys) are joined into one ``sendall``; a buffer of
    ``LARGE`` bytes or more goes out by itself, uncopied. On loopback this measured 1.4-1.7x
    faster for multi-MiB values than one gathered ``sendmsg`` that puts the value right behind
    a 24-byte header. With a token ``bucket`` the data goes out in paced slices.
    """
    total = 0
    small: list[Any] = []
    for b in buffers:
        v = b if isinstance(b, memoryview) else memoryview(b)
        if v.format != "B" or v.ndim != 1:
            v = v.cast("B")
        if len(v) < LARGE:
            small.append(v)
            continue
        if small:
            total += _send(sock, b"".join(small), bucket)
            small = []
        total += _send(sock, v, bucket)
    if small:
        total += _send(sock, small[0] if len(small) == 1 else b"".join(small), bucket)
    return total


def _send(sock: socket.socket, data: Any, bucket: Any) -> int:
    if bucket is None:
        sock.sendall(data)
        return len(data)
    bucket.begin()
    view = memoryview(data)
    chunk = bucket.chunk_size()
    for start in range(0, len(view), chunk):
        piece = view[start : start + chunk]
        bucket.consume(len(piece))
        sock.sendall(piece)
    return len(view)


class BufferedReceiver:
    """Receive side of a connection that reads ahead into a fixed buffer.

    One ``recv`` usually brings a whole small request (header + keys), instead of one system
    call per field. Large payloads bypass the buffer: :meth:`read_into` copies what is already
    buffered and receives the rest straight into the destination.
    """

    def __init__(self, sock: socket.socket, size: int = 64 << 10) -> None:
        self.sock = sock
        self.size = size
        self._view = memoryview(bytearray(size))
        self._start = 0
        self._end = 0

    def buffered(self) -> int:
        return self._end - self._start

    def recv_some(self) -> int:
        """One ``recv`` into free buffer space; returns the byte count (0 at end of stream)."""
        if self._start == self._end:
            self._start = self._end = 0
        elif self._end == self.size:
            self._compact()
        got = self.sock.recv_into(self._view[self._end :])
        self._end += got
        return got

    def _compact(self) -> None:
        pending = bytes(self._view[self._start : self._end])
        self._view[: len(pending)] = pending
        self._start, self._end = 0, len(pending)

    def read(self, n: int) -> memoryview:
        """The next ``n`` bytes (``n <= size``); the view is valid until the next read."""
        if self._end - self._start < n:
            if self._start + n > self.size:
                self._compact()
            while self._end - self._start < n:
                got = self.sock.recv_into(self._view[self._end :])
                if not got:
                    raise PeerClosed("connection closed by peer")
                self._end += got
        view = self._view[self._start : self._start + n]
        self._start += n
        return view

    def read_into(self, dest: memoryview) -> None:
        """Fill ``dest``: buffered bytes first, then straight from the socket."""
        k = min(len(dest), self._end - self._start)
        if k:
            dest[:k] = self._view[self._start : self._start + k]
            self._start += k
        if k < len(dest):
            recv_exact_into(self.sock, dest[k:])
