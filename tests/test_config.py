"""Core splitting between the engine and the data plane (DataPlaneConfig.split_cores)."""

from __future__ import annotations

import os

import pytest

from shadowserve.config import DataPlaneConfig
from shadowserve.cores import machine_cpus, parse_cores
from shadowserve.errors import ConfigError


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
