"""Core splitting between the engine and the data plane (DataPlaneConfig.split_cores)."""

from __future__ import annotations

import os

import pytest

from shadowserve.config import DataPlaneConfig, StoreConfig
from shadowserve.cores import machine_cpus, parse_cores
from shadowserve.errors import ConfigError
from shadowserve.values import redact_url


def test_parse_cores_forms_and_errors():
    assert parse_cores("0,2-3", [0, 1, 2, 3]) == [0, 2, 3]
    assert parse_cores("5", None) == [5]
    with pytest.raises(ConfigError, match="invalid core list"):
        parse_cores("a-b", [0])
    with pytest.raises(ConfigError, match="outside the usable set"):
        parse_cores("7", [0, 1])


@pytest.mark.skipif(len(machine_cpus()) < 2, reason="needs two CPUs")
def test_explicit_dataplane_cores_may_lie_outside_a_pinned_process():
    """An engine pinned to core A can still reserve core B for its data plane (the vLLM bench does)."""
    first, second = machine_cpus()[:2]
    saved = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, {first})
        engine, plane = DataPlaneConfig(dataplane_cores=str(second)).split_cores()
        assert engine == [first] and plane == [second]
        assert DataPlaneConfig().split_cores() == ([first], [first])  # auto only splits what it may use
        with pytest.raises(ConfigError, match="outside the usable set"):
            DataPlaneConfig(dataplane_cores=str(max(machine_cpus()) + 1)).split_cores()
    finally:
        os.sched_setaffinity(0, saved)


@pytest.mark.parametrize("url, shown", [
    ("rediss://alice:s3cr%40t@h:6380/0?ssl_ca_certs=/ca.pem", "rediss://alice:***@h:6380/0?ssl_ca_certs=/ca.pem"),
    ("redis://:onlypass@h:6379", "redis://:***@h:6379"),
    ("redis://u:p@ss@h:1/0", "redis://u:***@h:1/0"),  # an unencoded @: everything up to the last one
    ("shadowserve://h:7480?pool=2&token=abc&x=1", "shadowserve://h:7480?pool=2&token=***&x=1"),
    ("redis://user@h:1/0", "redis://user@h:1/0"),  # no password: nothing to hide
    ("redis://h:1/0", "redis://h:1/0"),
    ("file:///tmp/a:b@c", "file:///tmp/a:b@c"),  # a path is not a password
])
def test_redact_url_hides_passwords_and_tokens(url, shown):
    assert redact_url(url) == shown


def test_store_config_errors_mask_the_password():
    with pytest.raises(ConfigError) as info:
        StoreConfig(url="tenant:hunter2@h:1")  # the scheme forgotten
    assert "has no scheme" in str(info.value) and "hunter2" not in str(info.value)
