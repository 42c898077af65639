"""The store server under bad input, auth, disconnects, kills and eviction."""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest

from shadowserve.errors import StoreError
from shadowserve.settings import load_settings
from shadowserve.store import open_store
from shadowserve.store import protocol as P
from shadowserve.store.launch import free_port, start_store_server
from shadowserve.store.memory import LRUTable


def _addr(url: str) -> tuple[str, int]:
    host, port = url.split("://")[1].split("?")[0].split(":")
    return host, int(port)


def _raw(url: str) -> socket.socket:
    sock = socket.create_connection(_addr(url), timeout=5)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _read_all(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    chunks = []
    while True:
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            break
        if not data:
            break
        chunks.append(data)
    return b"".join(chunks)


def _error_and_close(sock: socket.socket) -> str:
    data = _read_all(sock)
    magic, _, status, _, body_len = P.HEADER.unpack_from(data)
    assert magic == P.RESPONSE_MAGIC and status == P.Status.ERR
    return data[P.HEADER.size : P.HEADER.size + body_len].decode()


@pytest.fixture
def client(store_server):
    s = open_store(store_server.url)
    yield s
    s.close()


def _still_serving(client, new_key) -> None:
    k = new_key()
    client.put(k, b"alive")
    assert client.get(k) == b"alive"


def test_wrong_magic_closes_only_that_connection(store_server, client, new_key):
    k = new_key()
    client.put(k, b"kept")
    with _raw(store_server.url) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\n\r\n")
        assert "wrong magic" in _error_and_close(sock)
    assert client.get(k) == b"kept"  # the pooled connection and the data are untouched
    _still_serving(client, new_key)


def test_oversized_frame_is_refused_before_reading_it(store_server, client, new_key):
    with _raw(store_server.url) as sock:
        sock.sendall(P.pack_request(P.Op.PUT, 1, 1 << 40))
        assert "too large" in _error_and_close(sock)
    with _raw(store_server.url) as sock:
        sock.sendall(P.pack_request(P.Op.GET_MANY, 3, 1 << 30))
        assert "too large" in _error_and_close(sock)
    _still_serving(client, new_key)


def test_malformed_key_list_and_unknown_command(store_server, client, new_key):
    with _raw(store_server.url) as sock:
        body = P.encode_keys([b"a" * 16])
        sock.sendall(P.pack_request(P.Op.CONTAINS, 2, len(body)) + body)  # count says 2 keys, body has 1
        assert "malformed key list" in _error_and_close(sock)
    with _raw(store_server.url) as sock:
        sock.sendall(P.pack_request(99, 0, 0))  # type: ignore[arg-type]
        assert "unknown command 99" in _error_and_close(sock)
    with _raw(store_server.url) as sock:
        sock.sendall(struct.pack("<2sBBIQ", P.REQUEST_MAGIC, 7, P.Op.PING, 0, 0))
        assert "version" in _error_and_close(sock)
    with _raw(store_server.url) as sock:
        sock.sendall(P.pack_request(P.Op.PUT, 1, 10) + struct.pack("<H", 0) + b"x" * 8)
        assert "key length" in _error_and_close(sock)
    _still_serving(client, new_key)


def test_half_sent_put_is_never_visible(store_server, client, new_key):
    k = new_key()
    value_len = 1 << 20
    with _raw(store_server.url) as sock:
        sock.sendall(P.pack_request(P.Op.PUT, 1, 2 + len(k) + value_len) + struct.pack("<H", len(k)) + k)
        sock.sendall(b"z" * (value_len // 2))
    time.sleep(0.2)
    assert client.get(k) is None
    assert client.contains([k]) == [False]
    _still_serving(client, new_key)


def test_client_disconnecting_mid_get(store_server, client, new_key):
    k = new_key()
    client.put(k, os.urandom(16 << 20))
    for _ in range(3):
        sock = _raw(store_server.url)
        body = P.encode_keys([k])
        sock.sendall(P.pack_request(P.Op.GET, 1, len(body)) + body)
        sock.recv(1000)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # reset, not FIN
        sock.close()
    buf = bytearray(16 << 20)
    assert client.get_into(k, buf) == 16 << 20
    _still_serving(client, new_key)


def test_auth_required_before_any_command(auth_store_server, new_key):
    url = auth_store_server.url.split("?")[0]
    for op in (P.Op.PING, P.Op.STATS, P.Op.GET):
        with _raw(url) as sock:
            body = P.encode_keys([b"k" * 16]) if op == P.Op.GET else b""
            sock.sendall(P.pack_request(op, 1 if body else 0, len(body)) + body)
            assert "authentication required" in _error_and_close(sock)
    anonymous = open_store(url)
    with pytest.raises(StoreError, match="authentication required"):
        anonymous.contains([b"k" * 16])
    anonymous.close()
    wrong = open_store(url + "?token=not-the-token")
    with pytest.raises(StoreError, match="wrong token"):
        wrong.put(b"k" * 16, b"v")
    wrong.close()
    good = open_store(auth_store_server.url)
    k = new_key()
    good.put(k, b"authorised")
    assert good.get(k) == b"authorised"
    assert good.stats()["auth"] is True
    good.close()


def test_token_auth_as_documented(auth_store_server):
    """docs/store.md's example: the token file on the server, the same file named in the client's URL
    (or by the settings), and what a client without it or with another token is told."""
    base, query = auth_store_server.url.split("?")
    token_file = query.removeprefix("token_file=")

    def ping(url: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "shadowserve.commands.store", "ping", url],
                              capture_output=True, text=True, timeout=60)

    assert ping(f"{base}?token_file={token_file}").stdout.startswith("ok: ")
    missing = ping(base)
    assert missing.returncode == 2 and "authentication required" in missing.stderr
    wrong = ping(f"{base}?token=not-the-token")
    assert wrong.returncode == 2 and "wrong token" in wrong.stderr and "not-the-token" not in wrong.stderr
    settings = load_settings(environ={"SHADOWSERVE_STORE": base, "SHADOWSERVE_STORE_TOKEN_FILE": token_file})
    store = open_store(settings.store_url)
    assert store.stats()["auth"] is True
    store.close()


def test_default_bind_is_loopback():
    import argparse

    from shadowserve.commands.store import add_arguments

    p = argparse.ArgumentParser()
    add_arguments(p)
    assert p.parse_args(["serve"]).host == "127.0.0.1"


def test_server_killed_mid_fetch_raises_store_error(new_key):
    server = start_store_server("--bandwidth", "200mbit")  # slow sends: the kill lands mid-value
    try:
        store = open_store(server.url + "?timeout=5s")
        k = new_key()
        store.put(k, b"q" * (32 << 20))
        outcome: list[BaseException | int | None] = []

        def fetch() -> None:
            try:
                outcome.append(store.get_into(k, bytearray(32 << 20)))
            except BaseException as exc:  # noqa: BLE001
                outcome.append(exc)

        t = threading.Thread(target=fetch)
        t.start()
        time.sleep(0.4)
        os.kill(server.pid, signal.SIGKILL)
        server.procs[0].wait(10)
        t.join(10)
        assert not t.is_alive(), "client hung after the server died"
        assert isinstance(outcome[0], StoreError) and "went away" in str(outcome[0])
        with pytest.raises(StoreError, match="cannot connect|went away"):
            store.get(k)
        store.close()
    finally:
        server.stop()


def test_silent_server_times_out_instead_of_hanging():
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    store = open_store(f"shadowserve://127.0.0.1:{port}?timeout=0.3s")
    start = time.monotonic()
    with pytest.raises(StoreError, match="did not answer"):
        store.contains([b"k" * 16])
    assert time.monotonic() - start < 3
    store.close()
    listener.close()


def test_connection_refused_is_store_error():
    store = open_store(f"shadowserve://127.0.0.1:{free_port()}?connect_timeout=1s")
    with pytest.raises(StoreError, match="cannot connect"):
        store.get(b"k" * 16)
    store.close()
    with pytest.raises(StoreError, match="closed"):
        store.get(b"k" * 16)


def test_idle_connection_dropped_by_server_is_replaced(new_key):
    server = start_store_server("--idle-timeout", "0.2s")
    try:
        store = open_store(server.url)
        k = new_key()
        store.put(k, b"v")
        time.sleep(0.5)  # the server closes our pooled connection meanwhile
        assert store.get(k) == b"v"
        store.close()
    finally:
        server.stop()


def test_restarted_server_is_reached_through_a_pool_of_dead_connections(new_key):
    """After the store restarts on its port, every pooled connection is dead: the next call must not
    fail on them (it did when two were pooled: the one retry took another dead one; bench soak)."""
    server = start_store_server()
    store = open_store(server.url)
    try:
        port = int(server.url.rsplit(":", 1)[1])
        barrier = threading.Barrier(4)

        def borrow() -> None:  # four calls at once leave four connections in the pool
            conn = store._acquire()
            barrier.wait()
            store._release(conn)

        threads = [threading.Thread(target=borrow) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(store._pool) == 4
        server.stop()
        server = start_store_server(port=port)
        k = new_key()
        store.put(k, b"v")
        assert store.get(k) == b"v"
    finally:
        store.close()
        server.stop()


def test_oversized_put_gets_the_reason_not_a_reset(new_key):
    """The server refuses a too-large value before reading it; the client must still get why.

    Before the server drained refused frames, about a third of these ended in "connection reset".
    """
    server = start_store_server("--capacity", "1MiB")
    try:
        store = open_store(server.url)
        for i in range(40):
            with pytest.raises(StoreError, match="too large"):
                store.put(new_key(), b"z" * ((2 << 20) + i * 4096))
        store.put(new_key(), b"ok")  # and the store keeps serving
        assert store.stats()["protocol_errors"] >= 40
    finally:
        server.stop()


def test_lru_eviction_at_byte_capacity(new_key):
    server = start_store_server("--capacity", "1MiB")
    try:
        store = open_store(server.url)
        keys = [new_key() for _ in range(4)]
        for k in keys[:3]:
            store.put(k, b"x" * (300 << 10))
        assert store.get_into(keys[0], bytearray(300 << 10)) == 300 << 10  # now most recently used
        store.put(keys[3], b"y" * (300 << 10))  # 1200 KiB > 1 MiB: evicts keys[1], the LRU
        assert store.contains(keys) == [True, False, True, True]
        stats = store.stats()
        assert stats["evictions"] == 1 and stats["bytes"] <= 1 << 20
        with pytest.raises(StoreError, match="too large"):
            store.put(new_key(), b"z" * (2 << 20))
        assert store.contains(keys) == [True, False, True, True]
        store.close()
    finally:
        server.stop()


def test_lru_table_unit():
    t = LRUTable(capacity=10)
    t.put(b"a", b"12345")
    t.put(b"b", b"12345")
    t.get(b"a")
    t.put(b"c", b"1")
    assert t.contains([b"a", b"b", b"c"]) == [True, False, True]
    t.put(b"a", b"1")  # replacing frees the old size
    assert t.stats()["bytes"] == 2
    with pytest.raises(StoreError):
        t.put(b"d", b"x" * 11)


def test_many_concurrent_clients(store_server, new_key):
    errors: list[BaseException] = []

    def one_client(i: int) -> None:
        try:
            s = open_store(store_server.url)
            k = new_key()
            s.put(k, bytes([i]) * 50_000)
            assert s.get(k) == bytes([i]) * 50_000
            s.close()
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=one_client, args=(i,)) for i in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors
