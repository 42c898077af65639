"""A short description of the machine a benchmark ran on, stored beside its numbers."""

from __future__ import annotations

import os
import platform


def machine_info() -> dict:
    """CPU model and count, memory, and the load average at the time of the call (others' work shows here)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    mem_gib = None
    try:
        mem_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    return {"cpu": cpu, "cpus": len(os.sched_getaffinity(0)), "memory_gib": mem_gib,
            "loadavg_1_5_15": [round(x, 2) for x in os.getloadavg()]}
