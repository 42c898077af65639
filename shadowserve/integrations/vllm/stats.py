"""Our counters in vLLM's own KV-transfer metrics: what each step's lookups decided and moved.

vLLM asks each connector half for ``get_kv_connector_stats()`` every step, sums the workers' and the
scheduler's objects (``aggregate``) and prints ``reduce()`` as its "KV Transfer metrics" log line each
logging interval. Each half reports what changed since it was last asked: the scheduler side its
lookups and fetch-or-recompute decisions (``decisions_<what>_<why>``, as in our /metrics), the worker
side its fetches by source, failures, saves and data-plane restarts.
"""

from __future__ import annotations

from dataclasses import dataclass

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats

from shadowserve.controlplane.manager import KVCacheManager


@dataclass
class ShadowServeStats(KVConnectorStats):
    """Counter increments, by name; adding two adds name by name."""

    def reset(self) -> None:
        self.data = {}

    def aggregate(self, other: KVConnectorStats) -> ShadowServeStats:
        out = dict(self.data)
        for k, v in other.data.items():
            out[k] = out.get(k, 0) + v
        return ShadowServeStats(data=out)

    def reduce(self) -> dict[str, int | float]:
        return dict(sorted(self.data.items()))

    def is_empty(self) -> bool:
        return not any(self.data.values())


def counters(manager: KVCacheManager) -> dict[str, int | float]:
    """A manager's counters, flat: its stats plus its policy's decisions by what and why."""
    s = manager.stats
    flat: dict[str, int | float] = {
        "prefix_lookup_tokens": s.prefix_lookup_tokens, "prefix_hit_tokens": s.prefix_hit_tokens,
        "fetched_tokens": s.fetched_tokens, "fetch_failures": s.fetch_failures,
        "saved_chunks": s.saved_chunks, "save_failures": s.save_failures,
        "dataplane_restarts": s.dataplane_restarts,
    }
    for source, n in s.fetched_chunks.items():
        flat[f"fetched_chunks_{source}"] = n
    for source, n in s.fetched_bytes.items():
        flat[f"fetched_bytes_{source}"] = n
    for (what, why), n in dict(manager.policy.counts).items():
        flat[f"decisions_{what}_{why}"] = n
    return flat


class CounterDelta:
    """What a manager's counters gained since the last ``take``."""

    def __init__(self, manager: KVCacheManager) -> None:
        self.manager = manager
        self._last: dict[str, int | float] = {}

    def take(self) -> ShadowServeStats | None:
        now = counters(self.manager)
        delta = {k: v - self._last.get(k, 0) for k, v in now.items() if v != self._last.get(k, 0)}
        self._last = now
        return ShadowServeStats(data=delta) if delta else None
