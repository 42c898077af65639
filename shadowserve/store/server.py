"""The ``shadowserve://`` store server: a byte-capacity LRU behind the binary protocol.

One thread per connection, blocking sockets with timeouts. A PUT is received into a buffer
of its own and enters the table only after its last byte, so a client that dies half-way
leaves nothing behind. A GET sends the stored buffer itself (headers joined in one send, the
value by itself), so large values are never copied in user space on either side. Any protocol violation gets an
error frame and closes that connection only.
"""

from __future__ import annotations

import hmac
import json
import logging
import socket
import threading
import time
from typing import Any

from shadowserve.errors import StoreError
from shadowserve.store import protocol as P
from shadowserve.store.memory import LRUTable
from shadowserve.store.shaping import TokenBucket
from shadowserve.store.sockio import BufferedReceiver, PeerClosed, send_buffers, set_kernel_timeouts

log = logging.getLogger("shadowserve.store.server")

_SOCKBUF = 4 << 20
# After refusing a frame, read and discard at most this much of its body (see _refuse).
_REFUSE_DRAIN_BYTES = 64 << 20
_REFUSE_DRAIN_S = 2.0


class _Reject(Exception):
    """A request we refuse: reply with an error frame, then close the connection."""


class StoreServer:
    """Serve an :class:`LRUTable` over TCP; ``start()`` in a thread or ``serve_forever()``."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 7480,
        capacity: int = 8 << 30,
        max_value_size: int = 512 << 20,
        token: str | None = None,
        bandwidth: float | None = None,
        max_connections: int = 1024,
        io_timeout: float = 30.0,
        idle_timeout: float = 600.0,
    ) -> None:
        self.table = LRUTable(capacity)
        self.max_value_size = min(max_value_size, capacity)
        self._token = token.encode() if token else None
        self._bucket = TokenBucket(bandwidth) if bandwidth else None
        self.max_connections = max_connections
        self.io_timeout = io_timeout
        self.idle_timeout = idle_timeout
        self._stop = threading.Event()
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        self._counters = {"connections_total": 0, "protocol_errors": 0, "bytes_in": 0, "bytes_out": 0}
        self._started = time.time()
        self._inflight = 0
        try:
            self._listener = socket.create_server((host, port), backlog=128, reuse_port=False)
        except OSError as exc:
            raise StoreError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
        self._listener.settimeout(0.2)
        self.host, self.port = self._listener.getsockname()[:2]
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> str:
        """The ``shadowserve://host:port`` URL clients should open."""
        return f"shadowserve://{self.host}:{self.port}"

    # ---- lifecycle -------------------------------------------------------------------------

    def serve_forever(self) -> None:
        """Accept connections until :meth:`shutdown`."""
        try:
            while not self._stop.is_set():
                try:
                    sock, peer = self._listener.accept()
                except TimeoutError:
                    continue
                except OSError:
                    if self._stop.is_set():
                        break
                    raise
                with self._conns_lock:
                    full = len(self._conns) >= self.max_connections
                    if not full:
                        self._conns.add(sock)
                        self._counters["connections_total"] += 1
                if full:
                    self._refuse(sock, f"too many connections (limit {self.max_connections})")
                    continue
                threading.Thread(target=self._serve_conn, args=(sock, peer), daemon=True).start()
        finally:
            self._listener.close()

    def start(self) -> StoreServer:
        """Serve from a background thread (tests, benchmarks); returns self."""
        self._thread = threading.Thread(target=self.serve_forever, name="store-server", daemon=True)
        self._thread.start()
        return self

    def shutdown(self) -> None:
        """Stop accepting, close every open connection, wait for the accept loop."""
        self._stop.set()
        with self._conns_lock:
            conns = list(self._conns)
        for sock in conns:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(timeout=5)

    def stats(self) -> dict[str, Any]:
        with self._conns_lock:
            open_conns = len(self._conns)
            counters = dict(self._counters)
        return {
            "backend": "shadowserve",
            **self.table.stats(),
            **counters,
            "connections_open": open_conns,
            "max_value_size": self.max_value_size,
            "auth": self._token is not None,
            "uptime_s": round(time.time() - self._started, 3),
        }

    # ---- one connection --------------------------------------------------------------------

    def _refuse(self, sock: socket.socket, message: str) -> None:
        """Send the error frame, then close without losing it.

        A refused frame's body is usually still arriving. Closing with unread bytes makes the
        kernel answer with a reset, which can destroy the error frame before the client reads
        it (the client then sees "connection reset" instead of the reason). So: half-close,
        and drain what the client is still sending for a bounded time and size, then close.
        """
        try:
            sock.settimeout(1.0)
            body = message.encode()
            send_buffers(sock, [P.pack_response(P.Status.ERR, 0, len(body)), body])
            sock.shutdown(socket.SHUT_WR)
            sink = bytearray(1 << 16)
            deadline, drained = time.monotonic() + _REFUSE_DRAIN_S, 0
            while drained < _REFUSE_DRAIN_BYTES and time.monotonic() < deadline:
                n = sock.recv_into(sink)
                if not n:
                    break
                drained += n
        except OSError:
            pass
        finally:
            sock.close()

    def _count(self, name: str, n: int = 1) -> None:
        with self._conns_lock:
            self._counters[name] += n

    def _count_io(self, bytes_in: int, bytes_out: int) -> None:
        with self._conns_lock:
            self._counters["bytes_in"] += bytes_in
            self._counters["bytes_out"] += bytes_out

    def _serve_conn(self, sock: socket.socket, peer: Any) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SOCKBUF)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _SOCKBUF)
        # Kernel timeouts on a blocking socket: one system call per send/recv, no poll() and
        # no mode switches per request. Waiting for the next header tolerates idle_timeout by
        # counting io_timeout-long slices.
        set_kernel_timeouts(sock, min(self.io_timeout, self.idle_timeout))
        conn = sock
        rd = BufferedReceiver(sock)
        authed = self._token is None
        try:
            while not self._stop.is_set():
                if not rd.buffered() and not self._wait_request(rd):
                    break  # clean close (or idle too long) between frames
                magic, version, op, count, body_len = P.HEADER.unpack(rd.read(P.HEADER.size))
                if magic != P.REQUEST_MAGIC:
                    raise _Reject("bad frame: not a shadowserve request (wrong magic)")
                if version != P.VERSION:
                    raise _Reject(f"unsupported protocol version {version} (server speaks {P.VERSION})")
                if not authed:
                    if op != P.Op.AUTH:
                        raise _Reject("authentication required: send AUTH with the shared token first")
                    authed = self._auth(rd, count, body_len)
                    continue
                self._dispatch(rd, op, count, body_len)
        except _Reject as exc:
            self._count("protocol_errors")
            log.info("closing %s: %s", peer, exc)
            self._refuse(sock, str(exc))
            sock = None  # type: ignore[assignment]
        except (PeerClosed, ConnectionError, TimeoutError, OSError) as exc:  # BlockingIOError: timed out
            log.debug("connection %s dropped: %s", peer, exc)
        except Exception:  # a bug or MemoryError: lose this connection, never the server
            log.exception("closing %s after an unexpected error", peer)
        finally:
            if sock is not None:
                sock.close()
            with self._conns_lock:
                self._conns.discard(conn)

    def _wait_request(self, rd: BufferedReceiver) -> bool:
        """Block until a request starts; False on a clean close or after idle_timeout."""
        idle_since = time.monotonic()
        while True:
            try:
                return rd.recv_some() > 0
            except BlockingIOError:  # one receive-timeout slice passed with nothing
                if time.monotonic() - idle_since >= self.idle_timeout or self._stop.is_set():
                    return False
            except ConnectionError:
                return False

    def _read_body(self, rd: BufferedReceiver, body_len: int, limit: int) -> memoryview:
        """The request body (a view valid until the next read on this connection)."""
        if body_len > limit:
            raise _Reject(f"frame too large: body of {body_len} bytes exceeds the limit of {limit}")
        if body_len <= rd.size:
            return rd.read(body_len)
        body = memoryview(bytearray(body_len))
        rd.read_into(body)
        return body

    def _ok(self, rd: BufferedReceiver, count: int = 0, body: bytes = b"") -> None:
        rd.sock.sendall(P.pack_response(P.Status.OK, count, len(body)) + body)

    def _auth(self, rd: BufferedReceiver, count: int, body_len: int) -> bool:
        token = bytes(self._read_body(rd, body_len, P.MAX_TOKEN_LEN))
        if self._token is not None and not hmac.compare_digest(token, self._token):
            raise _Reject("authentication failed: wrong token")
        self._ok(rd)
        return True

    def _keys(self, rd: BufferedReceiver, count: int, body_len: int) -> list[bytes]:
        body = self._read_body(rd, body_len, P.MAX_CONTROL_BODY)
        if count == 0:
            raise _Reject("request names no keys")
        try:
            return P.decode_keys(body, count)
        except ValueError as exc:
            raise _Reject(f"malformed key list: {exc}") from exc

    def _dispatch(self, rd: BufferedReceiver, op: int, count: int, body_len: int) -> None:
        sock = rd.sock
        if op == P.Op.GET or op == P.Op.GET_MANY:
            keys = self._keys(rd, count, body_len)
            values = self.table.get_many(keys)
            total = sum(P.ITEM.size + (0 if v is None else len(v)) for v in values)
            parts: list[Any] = [P.pack_response(P.Status.OK, len(keys), total)]
            for value in values:
                if value is None:
                    parts.append(P.ITEM.pack(P.MISSING))
                else:
                    parts.append(P.ITEM.pack(len(value)))
                    parts.append(value)
            sent = send_buffers(sock, parts, self._bucket)
            self._count_io(body_len, sent)
        elif op == P.Op.PUT:
            self._put(rd, count, body_len)
        elif op == P.Op.CONTAINS:
            present = self.table.contains(self._keys(rd, count, body_len))
            self._ok(rd, len(present), bytes(present))
        elif op == P.Op.LONGEST_PREFIX:
            self._ok(rd, self.table.longest_prefix(self._keys(rd, count, body_len)))
        elif op == P.Op.PING:
            if body_len:
                self._read_body(rd, body_len, P.MAX_TOKEN_LEN)
            self._ok(rd)
        elif op == P.Op.AUTH:
            self._auth(rd, count, body_len)
        elif op == P.Op.STATS:
            if body_len:
                raise _Reject("STATS takes no body")
            self._ok(rd, 0, json.dumps(self.stats()).encode())
        else:
            raise _Reject(f"unknown command {op}")

    def _put(self, rd: BufferedReceiver, count: int, body_len: int) -> None:
        if count != 1:
            raise _Reject(f"PUT carries exactly one key, got count={count}")
        if body_len > self.max_value_size + P.KEY_LEN.size + P.MAX_KEY_LEN:
            raise _Reject(
                f"frame too large: PUT body of {body_len} bytes exceeds the limit "
                f"(max value {self.max_value_size} bytes)"
            )
        (klen,) = P.KEY_LEN.unpack(rd.read(P.KEY_LEN.size))
        if klen == 0 or klen > P.MAX_KEY_LEN or P.KEY_LEN.size + klen > body_len:
            raise _Reject(f"malformed PUT: bad key length {klen}")
        key = bytes(rd.read(klen))
        vlen = body_len - P.KEY_LEN.size - klen
        if vlen > self.max_value_size:
            raise _Reject(f"value too large: {vlen} bytes exceeds the limit of {self.max_value_size}")
        # Half-received values count against capacity too, so many clients that start huge
        # PUTs at once cannot make the server allocate far beyond what it was told to hold.
        with self._conns_lock:
            if self._inflight + vlen > self.table.capacity:  # type: ignore[operator]
                busy = True
            else:
                busy = False
                self._inflight += vlen
        if busy:
            raise _Reject("server busy: too many PUT bytes in flight, retry later")
        try:
            value = bytearray(vlen)
            rd.read_into(memoryview(value))  # only a complete value reaches the table
        finally:
            with self._conns_lock:
                self._inflight -= vlen
        self._count_io(body_len, 0)
        self.table.put(key, value)
        self._ok(rd)
