"""What the control plane counts: lookups, fetches, saves, failures and restarts, for /metrics and benchmarks."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ManagerStats:
    """Counters since start, written by the manager and read by /metrics and the benchmarks."""

    prefix_lookup_tokens: int = 0
    prefix_hit_tokens: int = 0
    fetched_tokens: int = 0
    fetch_bytes: int = 0
    fetch_seconds: float = 0.0
    fetched_chunks: dict[str, int] = field(default_factory=lambda: {"tier": 0, "store": 0})  # by source
    fetched_bytes: dict[str, int] = field(default_factory=lambda: {"tier": 0, "store": 0})
    fetches: int = 0
    fetch_failures: int = 0
    saved_chunks: int = 0
    save_failures: int = 0
    dataplane_restarts: int = 0
    skipped_while_restarting: int = 0  # fetches computed and saves dropped while a restarted data plane started
    store_errors: dict[str, int] = field(default_factory=dict)  # failed calls/chunks by kind (store_health.py)
