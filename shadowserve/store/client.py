"""Client for the ``shadowserve://`` store server.

Thread-safe: each call borrows a connection from a small pool (a new one when all are busy),
so the data plane's fetch workers run in parallel without sharing a socket. Values are
received with ``recv_into`` straight into the caller's buffer. Every failure becomes a
:class:`StoreError`; every socket operation has a timeout, so nothing hangs.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Sequence
from typing import Any

from shadowserve.errors import StoreError, StoreUnavailable
from shadowserve.store import protocol as P
from shadowserve.store.base import StoreBase, check_key, writable_view
from shadowserve.store.shaping import LinkShape, wait_latency
from shadowserve.store.sockio import PeerClosed, recv_exact_into, send_buffers, set_kernel_timeouts

# Idle connections a client keeps; more are opened while more calls overlap, and closed after.
POOL_SIZE = 16
_SOCKBUF = 4 << 20
_BATCH = 4096  # keys per GET_MANY / CONTAINS frame, far below the server's body limit
_MAX_ERROR_BODY = 64 << 10


class _ServerRefused(Exception):
    """The server answered with an error frame (and is closing the connection)."""


class _Conn:
    """One connection plus the small buffers it reuses for every frame."""

    __slots__ = ("sock", "header", "hview", "item", "iview", "scratch", "received", "reused")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        # Room for the response header and the first item header, read together.
        self.header = bytearray(P.HEADER.size + P.ITEM.size)
        self.hview = memoryview(self.header)
        self.item = bytearray(P.ITEM.size)
        self.iview = memoryview(self.item)
        self.scratch: memoryview | None = None
        self.received = 0  # response bytes seen in the current call
        self.reused = False

    def recv(self, view: memoryview, bucket: Any = None) -> None:
        recv_exact_into(self.sock, view, bucket)
        self.received += len(view)

    def response(self, expect_count: int | None = None, with_item: bool = False) -> tuple[int, int]:
        """Read a response header; returns (count, body_len) or raises on an error frame.

        With ``with_item`` (a GET reply, which always carries at least one item header) the
        first item header comes in the same ``recv``: one system call fewer per GET.
        """
        want = P.HEADER.size + (P.ITEM.size if with_item else 0)
        got = 0
        while got < P.HEADER.size:  # never ask beyond `want`, so nothing past the frame is read
            n = self.sock.recv_into(self.hview[got:want])
            if not n:
                raise PeerClosed("connection closed by peer")
            got += n
        self.received += got
        magic, version, status, count, body_len = P.HEADER.unpack_from(self.header)
        if magic != P.RESPONSE_MAGIC or version != P.VERSION:
            raise StoreError("protocol violation: the server's reply is not a shadowserve response")
        if status == P.Status.ERR:
            body = bytearray(self.hview[P.HEADER.size : got])
            rest = min(body_len, _MAX_ERROR_BODY) - len(body)
            if rest > 0:
                tail = bytearray(rest)
                try:
                    self.recv(memoryview(tail))
                except OSError:
                    pass
                body += tail
            raise _ServerRefused(body.decode("utf-8", "replace") or "unspecified error")
        if status != P.Status.OK:
            raise StoreError(f"protocol violation: unknown status {status}")
        if expect_count is not None and count != expect_count:
            raise StoreError(f"protocol violation: expected {expect_count} items, got {count}")
        if with_item:
            if count < 1:
                raise StoreError("protocol violation: GET reply without items")
            if got < want:
                self.recv(self.hview[got:want])
            self.item[:] = self.hview[P.HEADER.size : want]
        return count, body_len

    def item_len(self) -> int:
        self.recv(self.iview)
        return P.ITEM.unpack(self.item)[0]

    def drain(self, n: int) -> None:
        """Read and drop ``n`` bytes so the connection stays usable after a refused value."""
        if self.scratch is None:
            self.scratch = memoryview(bytearray(256 << 10))
        while n:
            step = min(n, len(self.scratch))
            self.recv(self.scratch[:step])
            n -= step


class StoreClient(StoreBase):
    """``shadowserve://host:port``: see the module docstring."""

    def __init__(
        self,
        host: str,
        port: int,
        token: str | None = None,
        timeout: float = 30.0,
        connect_timeout: float = 5.0,
        shape: LinkShape | None = None,
        pool_size: int = POOL_SIZE,
    ) -> None:
        self.host, self.port = host, port
        self._token = token.encode() if token else None
        self.timeout, self.connect_timeout = timeout, connect_timeout
        self.shape = shape or LinkShape()
        self._bucket = self.shape.bucket()
        self._pool: list[_Conn] = []
        self._pool_size = pool_size
        self._lock = threading.Lock()
        self._closed = False

    def __repr__(self) -> str:
        return f"StoreClient(shadowserve://{self.host}:{self.port})"

    # ---- connections -----------------------------------------------------------------------

    def _where(self) -> str:
        return f"store server {self.host}:{self.port}"

    def _connect(self) -> _Conn:
        try:
            sock = socket.create_connection((self.host, self.port), timeout=self.connect_timeout)
        except TimeoutError as exc:
            raise StoreUnavailable(f"cannot connect to {self._where()}: timed out after {self.connect_timeout}s") from exc
        except OSError as exc:
            raise StoreUnavailable(f"cannot connect to {self._where()}: {exc.strerror or exc}") from exc
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _SOCKBUF)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SOCKBUF)
            set_kernel_timeouts(sock, self.timeout)
            conn = _Conn(sock)
            if self._token is not None:
                send_buffers(sock, [P.pack_request(P.Op.AUTH, 0, len(self._token)), self._token])
                conn.response()
            return conn
        except _ServerRefused as exc:
            sock.close()
            raise StoreError(f"{self._where()} refused the connection: {exc}") from exc
        except (OSError, StoreError) as exc:
            sock.close()
            raise StoreError(f"cannot set up a connection to {self._where()}: {exc}") from exc

    def _acquire(self) -> _Conn:
        with self._lock:
            if self._closed:
                raise StoreError("store client is closed")
            if self._pool:
                conn = self._pool.pop()
                conn.reused = True
                conn.received = 0
                return conn
        return self._connect()

    def _release(self, conn: _Conn) -> None:
        with self._lock:
            if not self._closed and len(self._pool) < self._pool_size:
                self._pool.append(conn)
                return
        conn.sock.close()

    def _call(self, what: str, fn: Any) -> Any:
        """Run ``fn(conn)`` on a pooled connection, mapping every failure to StoreError.

        A pooled connection the server has since closed fails before any reply byte; such a
        call is retried once on a fresh connection (every operation here is idempotent).
        """
        for attempt in range(2):
            conn = self._acquire()
            try:
                result = fn(conn)
            except _KeepConnection as exc:
                self._release(conn)
                raise exc.error from None
            except _ServerRefused as exc:
                conn.sock.close()
                raise StoreError(f"{self._where()} refused {what}: {exc}") from None
            except (TimeoutError, BlockingIOError) as exc:
                conn.sock.close()
                raise StoreUnavailable(f"{what}: {self._where()} did not answer within {self.timeout}s") from exc
            except (PeerClosed, ConnectionError, OSError) as exc:
                conn.sock.close()
                if conn.reused and conn.received == 0 and attempt == 0:
                    self._drop_pool()  # pooled alongside this one: a restarted server closed them all
                    continue
                reason = "closed the connection" if isinstance(exc, PeerClosed) else (exc.strerror or str(exc))
                raise StoreUnavailable(f"{what}: {self._where()} went away mid-transfer ({reason})") from exc
            except BaseException:
                conn.sock.close()
                raise
            self._release(conn)
            return result
        raise AssertionError("unreachable")

    # ---- operations --------------------------------------------------------------------------

    def _request(self, conn: _Conn, op: P.Op, count: int, body: bytes) -> float:
        if self._bucket is not None:
            self._bucket.begin()
        start = time.monotonic()
        send_buffers(conn.sock, [P.pack_request(op, count, len(body)), body])
        return start

    def put(self, key: bytes, data: bytes | memoryview) -> None:
        key = check_key(key)
        try:
            value = memoryview(data)
            if value.format != "B" or value.ndim != 1:
                value = value.cast("B")
        except TypeError as exc:
            raise StoreError(f"PUT data must be a contiguous buffer: {exc}") from exc
        head = P.pack_request(P.Op.PUT, 1, P.KEY_LEN.size + len(key) + len(value)) + P.KEY_LEN.pack(len(key)) + key

        def op(conn: _Conn) -> None:
            try:
                send_buffers(conn.sock, [head, value])
            except ConnectionError:
                # A server that refuses the frame (too large, store full) may answer and close
                # before it has read the whole value: its reason is worth more than "reset".
                conn.response()
                raise
            conn.response()

        self._call("PUT", op)

    def get(self, key: bytes) -> bytes | None:
        key = check_key(key)
        body = P.encode_keys([key])

        def op(conn: _Conn) -> bytes | None:
            start = self._request(conn, P.Op.GET, 1, body)
            wait_latency(start, self.shape.latency)
            conn.response(expect_count=1, with_item=True)
            n = P.ITEM.unpack(conn.item)[0]
            if n == P.MISSING:
                return None
            out = bytearray(n)
            conn.recv(memoryview(out), self._bucket)
            return bytes(out)

        return self._call("GET", op)

    def get_into(self, key: bytes, buffer: Any) -> int | None:
        """Receive the value straight into ``buffer``; returns its length or None if absent.

        Hot path: no allocation per call once the connection is warm. A value larger than
        the buffer is read off the wire and dropped, then StoreError is raised; the
        connection stays usable. On any other error the buffer's content is undefined.
        """
        return self.get_many_into([key], [buffer])[0]

    def get_many_into(self, keys: Sequence[bytes], buffers: Sequence[Any]) -> list[int | None]:
        """Pipelined: one request frame per up to 4096 keys, values streamed back in order."""
        if len(keys) != len(buffers):
            raise StoreError(f"{len(keys)} keys but {len(buffers)} buffers")
        out: list[int | None] = []
        for lo in range(0, len(keys), _BATCH):
            out.extend(self._get_batch(keys[lo : lo + _BATCH], buffers[lo : lo + _BATCH]))
        return out

    def _get_batch(self, keys: Sequence[bytes], buffers: Sequence[Any]) -> list[int | None]:
        if not keys:
            return []
        checked = [check_key(k) for k in keys]
        dests = [writable_view(b) for b in buffers]
        body = P.encode_keys(checked)
        op_code = P.Op.GET if len(checked) == 1 else P.Op.GET_MANY

        def op(conn: _Conn) -> list[int | None]:
            start = self._request(conn, op_code, len(checked), body)
            wait_latency(start, self.shape.latency)
            conn.response(expect_count=len(checked), with_item=True)
            sizes: list[int | None] = []
            error: StoreError | None = None
            for i, (key, dest) in enumerate(zip(checked, dests, strict=True)):
                n = P.ITEM.unpack(conn.item)[0] if i == 0 else conn.item_len()
                if n == P.MISSING:
                    sizes.append(None)
                elif n > len(dest):
                    conn.drain(n)
                    sizes.append(None)
                    if error is None:
                        error = StoreError(
                            f"value for key {key.hex()} is {n} bytes but the destination buffer holds {len(dest)}"
                        )
                else:
                    conn.recv(dest[:n], self._bucket)
                    sizes.append(n)
            if error is not None:
                raise _KeepConnection(error)
            return sizes

        return self._call("GET", op)

    def contains(self, keys: Sequence[bytes]) -> list[bool]:
        out: list[bool] = []
        for lo in range(0, len(keys), _BATCH):
            batch = [check_key(k) for k in keys[lo : lo + _BATCH]]
            if not batch:
                continue
            body = P.encode_keys(batch)

            def op(conn: _Conn, batch: list[bytes] = batch, body: bytes = body) -> list[bool]:
                start = self._request(conn, P.Op.CONTAINS, len(batch), body)
                wait_latency(start, self.shape.latency)
                _, body_len = conn.response(expect_count=len(batch))
                if body_len != len(batch):
                    raise StoreError("protocol violation: CONTAINS reply has the wrong length")
                flags = bytearray(body_len)
                conn.recv(memoryview(flags))
                return [b == 1 for b in flags]

            out.extend(self._call("CONTAINS", op))
        return out

    def longest_prefix(self, keys: Sequence[bytes]) -> int:
        """Leading keys present, answered by the server in one round trip per 4096 keys."""
        total = 0
        for lo in range(0, len(keys), _BATCH):
            batch = [check_key(k) for k in keys[lo : lo + _BATCH]]
            if not batch:
                break
            body = P.encode_keys(batch)

            def op(conn: _Conn, body: bytes = body, n: int = len(batch)) -> int:
                start = self._request(conn, P.Op.LONGEST_PREFIX, n, body)
                wait_latency(start, self.shape.latency)
                count, _ = conn.response()
                return count

            found = self._call("LONGEST_PREFIX", op)
            total += found
            if found < len(batch):
                break
        return total

    def ping(self) -> float:
        """Round-trip time of one PING in seconds."""

        def op(conn: _Conn) -> float:
            start = self._request(conn, P.Op.PING, 0, b"")
            conn.response()
            return time.monotonic() - start

        return self._call("PING", op)

    def stats(self) -> dict[str, Any]:
        def op(conn: _Conn) -> dict[str, Any]:
            self._request(conn, P.Op.STATS, 0, b"")
            _, body_len = conn.response()
            if body_len > P.MAX_CONTROL_BODY:
                raise StoreError("protocol violation: STATS reply too large")
            body = bytearray(body_len)
            conn.recv(memoryview(body))
            return json.loads(body)

        return self._call("STATS", op)

    def _drop_pool(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, []
        for conn in pool:
            conn.sock.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self._drop_pool()


class _KeepConnection(Exception):
    """Carries a StoreError raised with the connection still in a clean state."""

    def __init__(self, error: StoreError) -> None:
        super().__init__(str(error))
        self.error = error
