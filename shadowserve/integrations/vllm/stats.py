"""Our counters in vLLM's own KV-transfer metrics: what each step's lookups decided and moved.

vLLM asks each connector half for ``get_kv_connector_stats()`` every step, sums the workers' and the
scheduler's objects (``aggregate``), prints ``reduce()`` as its "KV Transfer metrics" log line each
logging interval, and hands the same increments to ``ShadowServePromMetrics`` for its Prometheus
``/metrics`` (``vllm:shadowserve_*``). Each half reports what changed since it was last asked: the
scheduler side its lookups and fetch-or-recompute decisions (``decisions_<what>_<why>``, as in our
/metrics), the worker side its fetches by source, failures, saves and data-plane restarts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics, KVConnectorStats

from shadowserve.controlplane.manager import KVCacheManager

# ManagerStats fields reported as they are, and those kept by source (name_<source>: tier, store). Each
# becomes a Prometheus counter ``vllm:shadowserve_<name>_total``.
_PLAIN = ("prefix_lookup_tokens", "prefix_hit_tokens", "fetched_tokens", "fetch_failures", "saved_chunks",
          "save_failures", "dataplane_restarts", "skipped_while_restarting")
_BY_SOURCE = ("fetched_chunks", "fetched_bytes")


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
    flat: dict[str, int | float] = {name: getattr(s, name) for name in _PLAIN}
    for name in _BY_SOURCE:
        for source, n in getattr(s, name).items():
            flat[f"{name}_{source}"] = n
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


class ShadowServePromMetrics(KVConnectorPromMetrics):
    """Our increments as vLLM Prometheus counters, per engine: the plain ones, fetches by source, and
    fetch-or-recompute decisions by what and why (``vllm:shadowserve_decisions_total``)."""

    def __init__(self, vllm_config: Any, metric_types: dict, labelnames: list[str],
                 per_engine_labelvalues: dict[int, list[object]]) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)

        def counter(name: str, doc: str, extra: tuple[str, ...] = ()) -> Any:
            return self._counter_cls(name=f"vllm:shadowserve_{name}", documentation=doc,
                                     labelnames=self._labelnames + list(extra))

        self._plain = {n: counter(n, f"ShadowServe connector: {n.replace('_', ' ')}") for n in _PLAIN}
        self._by_source = {n: counter(n, f"ShadowServe connector: {n.replace('_', ' ')}, by source", ("source",))
                           for n in _BY_SOURCE}
        self._decisions = counter("decisions", "ShadowServe fetch-or-recompute decisions on store hits, by "
                                  "decision and reason", ("decision", "reason"))

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        engine = [str(v) for v in self.per_engine_labelvalues.get(engine_idx, [])]
        for key, value in transfer_stats_data.items():
            if not value:
                continue
            if key in self._plain:
                self._plain[key].labels(*engine).inc(value)
            elif key.startswith("decisions_"):
                what, _, why = key.removeprefix("decisions_").partition("_")
                self._decisions.labels(*engine, what, why).inc(value)
            else:
                name, _, source = key.rpartition("_")
                if name in self._by_source:
                    self._by_source[name].labels(*engine, source).inc(value)
