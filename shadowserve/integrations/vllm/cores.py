"""Which cores the data plane takes inside vLLM when ``dataplane_cores`` is "auto".

vLLM's CPU backend binds each worker's OpenMP threads to a core list of its own choosing, and when a
KV connector is configured it keeps one more core per rank out of that list for the connector
(``vllm/utils/ompmultiprocessing.py``: ``reserve_cpu_num``). The worker inherits the binding as
OpenMP environment variables. The cores that vLLM left out, on the same NUMA node and not SMT
siblings of a bound core, are free of vLLM's compute, so the data plane takes those. Without a
binding (one process, ``VLLM_ENABLE_V1_MULTIPROCESSING=0``, or ``nobind``) nothing is known, and
the usual split of the process's own cores applies.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping

from shadowserve.config import machine_cpus, parse_cores, read_cpu_list
from shadowserve.errors import ConfigError

_SYS_CPU = "/sys/devices/system/cpu"


def omp_bound_cpus(env: Mapping[str, str]) -> list[int] | None:
    """The CPUs vLLM bound this worker's OpenMP threads to, from the variables it sets; None if unknown."""
    try:
        return _omp_bound_cpus(env)
    except ConfigError:
        return None  # a form we do not read: no binding known


def _omp_bound_cpus(env: Mapping[str, str]) -> list[int] | None:
    kmp = re.search(r"proclist=\[([0-9,\-\s]+)\]", env.get("KMP_AFFINITY", ""))
    if kmp:
        return parse_cores(kmp.group(1).replace(" ", ""), None)
    gomp = env.get("GOMP_CPU_AFFINITY", "").strip()
    if gomp and re.fullmatch(r"[0-9,\-\s]+", gomp):
        return parse_cores(",".join(gomp.replace(",", " ").split()), None)
    places = env.get("OMP_PLACES", "").strip()
    if places and re.fullmatch(r"[{}0-9,\s]+", places):  # "{0,1,2}" or "{0},{1}"; not "cores" or "{0:4}"
        ids = re.findall(r"\d+", places)
        return sorted({int(i) for i in ids}) or None
    return None


def _siblings(cpu: int) -> list[int]:
    return read_cpu_list(f"{_SYS_CPU}/cpu{cpu}/topology/thread_siblings_list")


def _node(cpu: int) -> int | None:
    try:
        names = os.listdir(f"{_SYS_CPU}/cpu{cpu}")
    except OSError:
        return None
    nodes = [int(n[4:]) for n in names if n.startswith("node") and n[4:].isdigit()]
    return nodes[0] if nodes else None


def cpus_left_free(bound: list[int], machine: list[int], siblings: Callable[[int], list[int]] = _siblings,
                   node: Callable[[int], int | None] = _node) -> list[int]:
    """CPUs of ``machine`` on the NUMA nodes of ``bound`` that are neither bound nor SMT siblings of a bound CPU."""
    taken = set(bound)
    for cpu in bound:
        taken.update(siblings(cpu))
    nodes = {node(cpu) for cpu in bound}
    return [c for c in machine if c not in taken and node(c) in nodes]


def auto_dataplane_cores(env: Mapping[str, str] | None = None) -> str | None:
    """A ``dataplane_cores`` value for "auto" inside a vLLM worker, or None to split as usual."""
    bound = omp_bound_cpus(os.environ if env is None else env)
    if not bound:
        return None
    free = cpus_left_free(bound, machine_cpus())
    return ",".join(map(str, free)) or None
