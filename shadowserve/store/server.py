"""The ``shadowserve://`` store server: a byte-capacity LRU behind the binary protocol.

One thread per connection, blocking sockets with timeouts. A PUT is received into a buffer
of its own and enters the table only after its last byte, so a client that dies half-way
leaves nothing behind. A GET sends the stored buffer itself (``sendmsg`` of header + value),
so values are never copied in user space on either side. Any protocol violation gets an
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
from shadowserve.store.sockio import PeerClosed, recv_exact_into, send_buffers

log = logging.getLogger("shadowserve.store.server")

_SOCKBUF = 4 << 20


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
        try:
            sock.settimeout(1.0)
            body = message.encode()
            send_buffers(sock, [P.pack_response(P.Status.ERR, 0, len(body)), body])
        except OSError:
            pass
        finally:
            sock.close()

    def _count(self, name: str, n: int = 1) -> None:
        with self._conns_lock:
            self._counters[name] += n

    def _serve_conn(self, sock: socket.socket, peer: Any) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SOCKBUF)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _SOCKBUF)
        conn = sock
        header = bytearray(P.HEADER.size)
        hview = memoryview(header)
        authed = self._token is None
        try:
            while not self._stop.is_set():
                sock.settimeout(self.idle_timeout)
                try:
                    n = sock.recv_into(hview)
                except (ConnectionError, TimeoutError):
                    break
                if not n:
                    break  # clean close between frames
                sock.settimeout(self.io_timeout)
                if n < len(hview):
                    recv_exact_into(sock, hview[n:])
                magic, version, op, count, body_len = P.HEADER.unpack(header)
                if magic != P.REQUEST_MAGIC:
                    raise _Reject("bad frame: not a shadowserve request (wrong magic)")
                if version != P.VERSION:
                    raise _Reject(f"unsupported protocol version {version} (server speaks {P.VERSION})")
                if not authed:
                    if op != P.Op.AUTH:
                        raise _Reject("authentication required: send AUTH with the shared token first")
                    authed = self._auth(sock, count, body_len)
                    continue
                self._dispatch(sock, op, count, body_len)
        except _Reject as exc:
            self._count("protocol_errors")
            log.info("closing %s: %s", peer, exc)
            self._refuse(sock, str(exc))
            sock = None  # type: ignore[assignment]
        except (PeerClosed, ConnectionError, TimeoutError, OSError) as exc:
            log.debug("connection %s dropped: %s", peer, exc)
        except Exception:  # a bug or MemoryError: lose this connection, never the server
            log.exception("closing %s after an unexpected error", peer)
        finally:
            if sock is not None:
                sock.close()
            with self._conns_lock:
                self._conns.discard(conn)

    def _read_body(self, sock: socket.socket, body_len: int, limit: int) -> bytearray:
        if body_len > limit:
            raise _Reject(f"frame too large: body of {body_len} bytes exceeds the limit of {limit}")
        body = bytearray(body_len)
        recv_exact_into(sock, memoryview(body))
        self._count("bytes_in", body_len)
        return body

    def _ok(self, sock: socket.socket, count: int = 0, body: bytes = b"") -> None:
        send_buffers(sock, [P.pack_response(P.Status.OK, count, len(body)), body])

    def _auth(self, sock: socket.socket, count: int, body_len: int) -> bool:
        token = bytes(self._read_body(sock, body_len, P.MAX_TOKEN_LEN))
        if self._token is not None and not hmac.compare_digest(token, self._token):
            raise _Reject("authentication failed: wrong token")
        self._ok(sock)
        return True

    def _keys(self, sock: socket.socket, count: int, body_len: int) -> list[bytes]:
        body = self._read_body(sock, body_len, P.MAX_CONTROL_BODY)
        if count == 0:
            raise _Reject("request names no keys")
        try:
            return P.decode_keys(body, count)
        except ValueError as exc:
            raise _Reject(f"malformed key list: {exc}") from exc

    def _dispatch(self, sock: socket.socket, op: int, count: int, body_len: int) -> None:
        if op == P.Op.GET or op == P.Op.GET_MANY:
            keys = self._keys(sock, count, body_len)
            values = self.table.get_many(keys)
            parts: list[Any] = [b""]
            total = 0
            for value in values:
                if value is None:
                    parts.append(P.ITEM.pack(P.MISSING))
                    total += P.ITEM.size
                else:
                    parts.append(P.ITEM.pack(len(value)))
                    parts.append(value)
                    total += P.ITEM.size + len(value)
            parts[0] = P.pack_response(P.Status.OK, len(keys), total)
            self._count("bytes_out", send_buffers(sock, parts, self._bucket))
        elif op == P.Op.PUT:
            self._put(sock, count, body_len)
        elif op == P.Op.CONTAINS:
            present = self.table.contains(self._keys(sock, count, body_len))
            self._ok(sock, len(present), bytes(present))
        elif op == P.Op.LONGEST_PREFIX:
            self._ok(sock, self.table.longest_prefix(self._keys(sock, count, body_len)))
        elif op == P.Op.PING:
            if body_len:
                self._read_body(sock, body_len, P.MAX_TOKEN_LEN)
            self._ok(sock)
        elif op == P.Op.AUTH:
            self._auth(sock, count, body_len)
        elif op == P.Op.STATS:
            if body_len:
                raise _Reject("STATS takes no body")
            self._ok(sock, 0, json.dumps(self.stats()).encode())
        else:
            raise _Reject(f"unknown command {op}")

    def _put(self, sock: socket.socket, count: int, body_len: int) -> None:
        if count != 1:
            raise _Reject(f"PUT carries exactly one key, got count={count}")
        if body_len > self.max_value_size + P.KEY_LEN.size + P.MAX_KEY_LEN:
            raise _Reject(
                f"frame too large: PUT body of {body_len} bytes exceeds the limit "
                f"(max value {self.max_value_size} bytes)"
            )
        klen_buf = bytearray(P.KEY_LEN.size)
        recv_exact_into(sock, memoryview(klen_buf))
        (klen,) = P.KEY_LEN.unpack(klen_buf)
        if klen == 0 or klen > P.MAX_KEY_LEN or P.KEY_LEN.size + klen > body_len:
            raise _Reject(f"malformed PUT: bad key length {klen}")
        key = bytearray(klen)
        recv_exact_into(sock, memoryview(key))
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
            recv_exact_into(sock, memoryview(value))  # only a complete value reaches the table
        finally:
            with self._conns_lock:
                self._inflight -= vlen
        self._count("bytes_in", body_len)
        self.table.put(bytes(key), value)
        self._ok(sock)
