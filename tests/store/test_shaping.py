"""Link emulation: the token bucket's rate, latency, and sharing across connections."""

from __future__ import annotations

import threading
import time

import pytest

from shadowserve.store import open_store
from shadowserve.store.shaping import LinkShape, ShapedStore, TokenBucket


def test_token_bucket_long_run_rate():
    bucket = TokenBucket(50e6)  # 50 MB/s
    bucket.begin()
    start = time.monotonic()
    for _ in range(200):
        bucket.consume(100_000)  # 20 MB in all: 0.4 s
    elapsed = time.monotonic() - start
    assert 0.38 < elapsed < 0.46


def test_idle_link_banks_no_credit():
    bucket = TokenBucket(10e6)
    time.sleep(0.1)
    bucket.begin()
    start = time.monotonic()
    bucket.consume(500_000)  # 50 ms on a 10 MB/s link, even after idling
    assert time.monotonic() - start >= 0.045


def _timed_reads(store, key: bytes, buf: bytearray, n: int) -> float:
    store.get_into(key, buf)
    start = time.monotonic()
    for _ in range(n):
        store.get_into(key, buf)
    return time.monotonic() - start


@pytest.mark.parametrize("backend", ["memory", "shadowserve"])
def test_shaped_store_delivers_requested_rate(backend, store_server, new_key):
    base = "memory://" if backend == "memory" else store_server.url
    writer = open_store(base)
    k = new_key()
    writer.put(k, b"r" * (2 << 20))
    shaped = open_store(base + "?bandwidth=400mbit")  # 50 MB/s
    if backend == "memory":  # a private memory:// store: shape the same instance instead
        shaped = ShapedStore(writer, LinkShape.from_options("400mbit", None))
    elapsed = _timed_reads(shaped, k, bytearray(2 << 20), 10)  # 20 MiB: 0.42 s
    expected = 10 * (2 << 20) / 50e6
    assert abs(elapsed / expected - 1) < 0.10, (elapsed, expected)
    shaped.close()
    writer.close()


def test_bucket_is_shared_by_all_connections(store_server, new_key):
    writer = open_store(store_server.url)
    k = new_key()
    writer.put(k, b"s" * (1 << 20))
    shaped = open_store(store_server.url + "?bandwidth=400mbit")

    def reader() -> None:
        buf = bytearray(1 << 20)
        for _ in range(5):
            shaped.get_into(k, buf)

    threads = [threading.Thread(target=reader) for _ in range(4)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    elapsed = time.monotonic() - start
    expected = 20 * (1 << 20) / 50e6  # four connections share one 50 MB/s link
    assert elapsed > 0.9 * expected, (elapsed, expected)
    shaped.close()
    writer.close()


def test_latency_is_added_per_request(store_server, new_key):
    for url in ("memory://?latency=20ms", store_server.url + "?latency=20ms"):
        store = open_store(url)
        store.contains([new_key()])
        start = time.monotonic()
        for _ in range(5):
            store.contains([new_key()])
        assert time.monotonic() - start >= 5 * 0.02
        store.close()
