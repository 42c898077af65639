"""Store URLs, StoreConfig validation and the ``shadowserve store`` command."""

from __future__ import annotations

import pytest

from shadowserve.cli import main
from shadowserve.config import StoreConfig
from shadowserve.errors import ConfigError
from shadowserve.store import open_store
from shadowserve.store.memory import MemoryStore
from shadowserve.store.shaping import ShapedStore
from shadowserve.values import parse_duration


def test_parse_duration():
    assert parse_duration("0.2ms") == pytest.approx(2e-4)
    assert parse_duration("5s") == 5 and parse_duration(3) == 3
    with pytest.raises(ConfigError):
        parse_duration("fast")


@pytest.mark.parametrize(
    "kwargs",
    [{"url": "nowhere"}, {"timeout": 0}, {"bandwidth": "lots"}, {"latency": "-1ms"}, {"capacity": "0"},
     {"port": 70000}, {"max_connections": 0}],
)
def test_store_config_rejects(kwargs):
    with pytest.raises(ConfigError):
        StoreConfig(**kwargs)


def test_open_store_urls(tmp_path):
    assert isinstance(open_store("memory://"), MemoryStore)
    assert open_store("memory://shared") is open_store("memory://shared")
    assert isinstance(open_store("memory://?bandwidth=1gbit"), ShapedStore)
    assert isinstance(open_store(StoreConfig(url="memory://", latency="1ms")), ShapedStore)
    for bad in ("ftp://x", "memory://?bandwith=1gbit", "file://", "shadowserve://:80", "redis://h:1/x"):
        with pytest.raises(ConfigError):
            open_store(bad)


def test_memory_capacity_evicts():
    store = open_store("memory://?capacity=10")
    store.put(b"a", b"123456")
    store.put(b"b", b"123456")
    assert store.contains([b"a", b"b"]) == [False, True]


def test_cli_ping_and_stats(store_server, capsys):
    assert main(["store", "ping", store_server.url]) == 0
    assert "ok:" in capsys.readouterr().out
    assert main(["store", "stats", store_server.url]) == 0
    assert '"backend": "shadowserve"' in capsys.readouterr().out
    assert main(["store", "ping", "shadowserve://127.0.0.1:1?connect_timeout=1s"]) == 2
    assert "error: cannot connect" in capsys.readouterr().err
