"""Real servers for the store tests: started on free loopback ports, stopped by PID."""

from __future__ import annotations

import os

import pytest

from shadowserve.store.launch import redis_available, start_redis, start_redis_cluster, start_store_server

BACKENDS = ["memory", "memory-shaped", "file", "shadowserve", "shadowserve-auth", "redis", "redis-cluster"]


@pytest.fixture(scope="session")
def store_server():
    """``shadowserve store serve`` as a child process, shared by the session."""
    server = start_store_server("--capacity", "256MiB")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def auth_store_server():
    server = start_store_server("--capacity", "64MiB", token="s3cret-token")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_server():
    ok, why = redis_available()
    if not ok:
        pytest.skip(why)
    server = start_redis()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_cluster():
    ok, why = redis_available()
    if not ok:
        pytest.skip(why)
    cluster = start_redis_cluster(masters=3)
    yield cluster
    cluster.stop()


@pytest.fixture
def new_key():
    """Fresh random 16-byte keys, so tests sharing a server never collide."""
    return lambda: os.urandom(16)


@pytest.fixture(params=BACKENDS)
def store_url(request, tmp_path):
    name = request.param
    if name == "memory":
        return "memory://"
    if name == "memory-shaped":
        return "memory://?bandwidth=40gbit&latency=0.1ms"
    if name == "file":
        return f"file://{tmp_path / 'chunks'}"
    if name == "shadowserve":
        return request.getfixturevalue("store_server").url
    if name == "shadowserve-auth":
        return request.getfixturevalue("auth_store_server").url
    if name == "redis":
        return request.getfixturevalue("redis_server").url
    return request.getfixturevalue("redis_cluster").url


@pytest.fixture
def store(store_url):
    from shadowserve.store import open_store

    s = open_store(store_url)
    yield s
    s.close()
