"""Redis backends when the server is missing or goes away: fast StoreError, no hang."""

from __future__ import annotations

import time

import pytest

from shadowserve.errors import StoreError, StoreUnavailable
from shadowserve.store import open_store
from shadowserve.store.launch import free_port, redis_available, start_redis

pytestmark = pytest.mark.skipif(not redis_available()[0], reason=redis_available()[1])


@pytest.mark.parametrize("scheme", ["redis", "redis+cluster"])
def test_unreachable_redis_is_a_fast_store_error(scheme):
    start = time.monotonic()
    with pytest.raises(StoreError, match="cannot connect"):
        open_store(f"{scheme}://127.0.0.1:{free_port()}?connect_timeout=1s")
    assert time.monotonic() - start < 3


def test_redis_going_away_mid_use():
    server = start_redis()
    try:
        store = open_store(server.url + "?timeout=2s&connect_timeout=1s")
        store.put(b"k" * 16, b"v" * 1000)
        assert store.get_into(b"k" * 16, bytearray(1000)) == 1000
    finally:
        server.stop()
    start = time.monotonic()
    with pytest.raises(StoreError, match="failed"):
        store.get_into(b"k" * 16, bytearray(1000))
    with pytest.raises(StoreError):
        store.contains([b"k" * 16])
    assert time.monotonic() - start < 5
    store.close()


def test_cluster_spreads_keys_over_masters(redis_cluster):
    import os

    store = open_store(redis_cluster.url)
    keys = [os.urandom(16) for _ in range(60)]
    for k in keys:
        store.put(k, k)
    bufs = [bytearray(16) for _ in keys]
    assert store.get_many_into(keys, bufs) == [16] * 60
    assert [bytes(b) for b in bufs] == keys
    stats = store.stats()
    assert stats["nodes"] == 3 and stats["keys"] >= 60
    store.close()


def test_a_vanished_redis_is_reported_as_unavailable():
    """A connection error is StoreUnavailable (the operator's 'store unreachable'), not just any StoreError."""
    server = start_redis()
    store = open_store(server.url)
    store.put(b"k" * 16, b"v")
    server.stop()
    with pytest.raises(StoreUnavailable):
        store.get(b"k" * 16)
    store.close()
