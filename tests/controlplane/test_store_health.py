"""The store's up/down state and its log lines: one line per change, write rejections rate-limited,
secrets never shown."""

from __future__ import annotations

import logging

import pytest

from shadowserve.controlplane.store_health import StoreHealth, public_url


def test_each_change_of_state_is_logged_once(caplog):
    caplog.set_level(logging.INFO, logger="shadowserve.store")
    health = StoreHealth("shadowserve://10.0.0.5:7480")
    assert health.up is None and health.reason() is None
    for _ in range(3):
        health.unreachable("cannot connect: Connection refused")
    assert health.up is False and health.errors == {"unreachable": 3}
    assert "10.0.0.5:7480 unreachable" in health.reason()
    health.answered()
    health.answered()
    assert health.up is True and health.reason() is None
    lines = [r.getMessage() for r in caplog.records]
    assert sum("is unreachable" in m for m in lines) == 1
    assert sum("reachable again" in m for m in lines) == 1


def test_write_rejections_are_rate_limited_and_counted(caplog):
    caplog.set_level(logging.WARNING, logger="shadowserve.store")
    health = StoreHealth("redis://127.0.0.1:6379/0")
    for _ in range(50):
        health.failed("rejected", 2, "refused PUT: value too large")
    assert health.errors == {"rejected": 100}
    rejects = [r.getMessage() for r in caplog.records if "rejects writes" in r.getMessage()]
    assert len(rejects) == 1 and "2 chunk(s) not saved" in rejects[0]
    health.failed("corrupt", 1, "bad checksum")
    health.failed("no-such-kind", 1, "?")
    assert health.errors["corrupt"] == 1 and health.errors["other"] == 1
    assert health.up is None  # neither says the store is gone


@pytest.mark.parametrize("url, shown", [
    ("redis://alice:s3cret@db.internal:6379/0", "redis://alice:***@db.internal:6379/0"),
    ("rediss://:s3cret@db.internal:6380", "rediss://:***@db.internal:6380"),
    ("shadowserve://127.0.0.1:7480?token_file=/run/token&bandwidth=1gbit", "shadowserve://127.0.0.1:7480"),
    ("file:///var/cache/kv", "file:///var/cache/kv"),
])
def test_public_url_hides_secrets(url, shown):
    assert public_url(url) == shown
