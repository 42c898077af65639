"""Core placement in one place: which CPUs exist, which the data plane gets, and who is pinned where.

The engine computes on its cores and the data plane (or, in benchmarks, the store server playing the
remote machine) runs on the reserved rest, in every fetch mode. Inside vLLM, the cores its CPU
backend's binding left free are the data plane's ("auto"): vLLM binds each worker's OpenMP threads to
a core list of its own choosing and, with a KV connector configured, keeps one more core per rank out
of that list (``vllm/utils/ompmultiprocessing.py``: ``reserve_cpu_num``). The worker inherits the
binding as OpenMP environment variables; the cores left out, on the same NUMA node and not SMT
siblings of a bound core, are free of vLLM's compute. Without a binding (one process,
``VLLM_ENABLE_V1_MULTIPROCESSING=0``, or ``nobind``) nothing is known, and the usual split applies.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping

from shadowserve.errors import ConfigError


def machine_cpus() -> list[int]:
    """CPUs a process started here may be moved to, whatever this process is pinned to.

    The cgroup's effective cpuset when the kernel says (cgroup v2), else the online CPUs. A process
    pinned to some cores (``taskset``, a benchmark's engine) may still reserve others for its data plane.
    """
    for path in ("/sys/fs/cgroup/cpuset.cpus.effective", "/sys/devices/system/cpu/online"):
        if cpus := read_cpu_list(path):
            return cpus
    return sorted(os.sched_getaffinity(0))


def read_cpu_list(path: str) -> list[int]:
    """A kernel CPU list file (``0-3,8``) as CPU ids; [] when it is missing, empty or unreadable."""
    try:
        with open(path) as f:
            text = f.read().strip()
        return parse_cores(text, None) if text else []
    except (OSError, ConfigError):
        return []


def parse_cores(spec: str, available: list[int] | None) -> list[int]:
    """Parse ``"1"``, ``"2-3"`` or ``"0,2"`` into CPU ids, checked against ``available`` (when given)."""
    cores: list[int] = []
    try:
        for part in spec.split(","):
            part = part.strip()
            if "-" in part:
                lo, hi = part.split("-")
                cores.extend(range(int(lo), int(hi) + 1))
            elif part:
                cores.append(int(part))
    except ValueError:
        raise ConfigError(f"invalid core list {spec!r}: use forms like 1, 2-3 or 0,2") from None
    bad = [c for c in cores if available is not None and c not in available]
    if bad or not cores:
        raise ConfigError(f"core list {spec!r} names cores outside the usable set {available}")
    return sorted(set(cores))


def split_cores(dataplane_cores: str) -> tuple[list[int], list[int]]:
    """(engine cores, data-plane cores): "auto" splits the cores this process may use; an explicit
    list may also name cores this process is kept off (the engine's process pinned elsewhere)."""
    available = sorted(os.sched_getaffinity(0))
    if dataplane_cores == "auto":
        n = max(1, len(available) // 4)
        plane = available[-n:]
    else:
        plane = parse_cores(dataplane_cores, sorted(set(available) | set(machine_cpus())))
    engine = [c for c in available if c not in plane] or available
    return engine, plane


def explain_split(dataplane_cores: str, engine: list[int], plane: list[int], pinned: bool, remote: bool,
                  pipeline_on_engine: bool = False) -> str:
    """One line for the operator: which cores the engine and the data plane got, and why."""
    usable = sorted(set(engine) | set(plane))
    if not remote and not pinned:
        return f"engine on cores {_fmt(usable)}: no store, so no data plane and nothing reserved"
    why = (f"--dataplane-cores {dataplane_cores}" if dataplane_cores != "auto"
           else f"auto: a quarter of the {len(usable)} usable cores, at least one")
    engine_part = (f"engine pinned to cores {_fmt(engine)} ({len(engine)} compute thread(s))" if pinned
                   else f"engine unpinned on cores {_fmt(usable)}")
    plane_part = f"data plane on cores {_fmt(plane)}" if remote else f"cores {_fmt(plane)} kept free"
    if remote and pipeline_on_engine:
        return (f"{engine_part}, its fetch pipeline on the same cores (baseline_cores=engine: the paper's "
                f"CacheGen-Async placement), cores {_fmt(plane)} left idle ({why})")
    return (f"{engine_part}, {plane_part} ({why}); fetching never competes with the model for a core, and "
            f"prompts computed from scratch use only the engine's cores (--dataplane-cores changes the split)")


def _fmt(cores: list[int]) -> str:
    return ",".join(map(str, cores))


def pin_to_dataplane_cores(pid: int) -> None:
    """Keep a helper process (the store server: the "remote" machine) off the engine's cores."""
    _, plane = split_cores("auto")
    try:
        os.sched_setaffinity(pid, plane)
    except OSError:
        pass


# ---- inside vLLM ---------------------------------------------------------------------------------

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
