"""Prometheus metrics with the names in DESIGN.md §3, on a registry owned by one server.

Latency histograms are observed by the engine thread when a request finishes; everything the
control and data planes already count (lookups, hits, fetch bytes, stage busy time, buffer
occupancy, queue lengths) is read at scrape time, so serving pays nothing per step for it.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from shadowserve.controlplane.fetch_policy import DECISIONS, REASONS
from shadowserve.controlplane.store_health import ERROR_KINDS
from shadowserve.engine.engine import LLMEngine
from shadowserve.engine.request import RequestOutput

PREFIX = "shadowserve_"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
TPOT_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5)
FETCH_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ServerMetrics:
    """Everything ``/metrics`` shows for one engine."""

    def __init__(self, engine: LLMEngine) -> None:
        self.registry = CollectorRegistry()
        self.ttft = Histogram(PREFIX + "ttft_seconds", "Time to first token", registry=self.registry,
                              buckets=TTFT_BUCKETS)
        self.tpot = Histogram(PREFIX + "tpot_seconds", "Mean time per output token after the first, per request",
                              registry=self.registry, buckets=TPOT_BUCKETS)
        self.requests = Counter(PREFIX + "requests", "Requests by how they ended", ["state"],
                                registry=self.registry)
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prompt tokens of finished requests",
                                     registry=self.registry)
        self.generation_tokens = Counter(PREFIX + "generation_tokens", "Output tokens of finished requests",
                                         registry=self.registry)
        self.hit_tokens = Counter(PREFIX + "prefix_hit_tokens",
                                  "Prompt tokens of finished requests not computed, by where their KV came from "
                                  "(local: the engine's prefix cache; remote: fetched from the store)",
                                  ["source"], registry=self.registry)
        for source in ("local", "remote"):
            self.hit_tokens.labels(source)
        self.fetch = Histogram(PREFIX + "fetch_seconds",
                               "Per request that fetched: seconds from its fetch command to its KV landing",
                               registry=self.registry, buckets=FETCH_BUCKETS)
        self.registry.register(_EngineCollector(engine))

    def observe_finished(self, out: RequestOutput) -> None:
        """Called on the engine thread for every request that finished (aborts included)."""
        state = "aborted" if out.finish_reason == "abort" else "finished"
        self.requests.labels(state).inc()
        self.prompt_tokens.inc(len(out.prompt_token_ids))
        self.generation_tokens.inc(len(out.token_ids))
        self.hit_tokens.labels("local").inc(out.num_cached_tokens)
        self.hit_tokens.labels("remote").inc(out.num_fetched_tokens)
        if out.fetch_ms is not None:
            self.fetch.observe(out.fetch_ms / 1e3)
        if out.ttft_ms is not None:
            self.ttft.observe(out.ttft_ms / 1e3)
        if out.tpot_ms is not None:
            self.tpot.observe(out.tpot_ms / 1e3)

    def observe_outcome(self, state: str) -> None:
        """Requests that never finished in the engine: ``rejected`` (bad input), ``aborted``, ``failed``."""
        self.requests.labels(state).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCollector(Collector):
    """Reads the engine's, control plane's and data plane's own counters at scrape time."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine

    def collect(self):
        sched = self.engine.scheduler
        states = GaugeMetricFamily(PREFIX + "requests_in_state", "Requests now in each scheduler state",
                                   labels=["state"])
        for state, q in (("waiting", sched.waiting), ("fetching", sched.fetching), ("running", sched.running)):
            states.add_metric([state], len(q))
        yield states
        bm = self.engine.block_manager
        yield GaugeMetricFamily(PREFIX + "kv_blocks_total", "KV blocks in the pool", value=bm.num_blocks)
        yield GaugeMetricFamily(PREFIX + "kv_blocks_used", "KV blocks held by requests",
                                value=bm.num_blocks - bm.num_free_blocks)
        manager = self.engine.kv_manager
        stats = getattr(manager, "stats", None)
        counters = {  # ManagerStats field -> help; exported as shadowserve_<field>_total
            "prefix_lookup_tokens": "Prompt tokens looked up in the remote store",
            "fetched_tokens": "Prompt tokens whose KV landed from the store",
            "fetch_bytes": "Compressed bytes fetched from the store",
            "fetch_failures": "Fetches that failed or timed out and fell back to recompute",
            "saved_chunks": "Chunks written to the store",
            "save_failures": "Chunk saves that failed",
            "dataplane_restarts": "Times a dead or hung data plane was restarted",
            "skipped_while_restarting": "Fetches computed and saves dropped while a restarted data plane started",
        }
        for name, doc in counters.items():
            yield CounterMetricFamily(PREFIX + name, doc, value=getattr(stats, name, 0) if stats else 0)
        yield CounterMetricFamily(PREFIX + "store_hit_tokens",
                                  "Prompt tokens the store held at lookup (the local cache may have served some)",
                                  value=stats.prefix_hit_tokens if stats else 0)
        errors = CounterMetricFamily(PREFIX + "store_errors", "Failed store calls and chunks, by kind",
                                     labels=["kind"])
        seen = dict(stats.store_errors) if stats else {}
        for kind in ERROR_KINDS:
            errors.add_metric([kind], seen.get(kind, 0))
        yield errors
        health = getattr(manager, "store_health", None)
        store_up = 0.0 if health is not None and health.up is False else 1.0
        yield GaugeMetricFamily(PREFIX + "store_up", "0 while the store is unreachable (1 without a store)",
                                value=store_up)
        plane = {}
        if manager is not None:
            try:
                plane = manager.backend.stats() or {}
            except Exception:
                plane = {}
        busy = GaugeMetricFamily(PREFIX + "dataplane_stage_busy_ratio",
                                 "Share of time each pipeline stage's workers were busy", labels=["stage"])
        for stage, ratio in sorted(plane.get("stage_busy_ratio", {}).items()):
            busy.add_metric([stage], ratio)
        yield busy
        occupancy = GaugeMetricFamily(PREFIX + "dataplane_buffer_occupancy",
                                      "Share of each slot pool's slots in use", labels=["pool"])
        for pool, value in sorted(plane.get("buffer_occupancy", {}).items()):
            occupancy.add_metric([pool], value)
        yield occupancy
        up = 1.0 if manager is None or (manager.backend.healthy() and manager.backend.ready()) else 0.0
        yield GaugeMetricFamily(PREFIX + "dataplane_up", "1 when the data plane answers heartbeats (0 while a "
                                "restarted one starts)", value=up)
        yield from _tier_metrics(stats, plane.get("local_tier") or {})
        yield from _policy_metrics(getattr(manager, "policy", None))


def _tier_metrics(stats, tier: dict):
    """Where fetched chunks came from (the local tier or the store), and the tier's occupancy."""
    chunks = CounterMetricFamily(PREFIX + "fetched_chunks", "Chunks that landed, by source (tier: the local "
                                 "compressed tier, no network; store: over the link)", labels=["source"])
    nbytes = CounterMetricFamily(PREFIX + "fetched_source_bytes", "Compressed bytes of landed chunks, by source",
                                 labels=["source"])
    for source in ("tier", "store"):
        chunks.add_metric([source], stats.fetched_chunks[source] if stats else 0)
        nbytes.add_metric([source], stats.fetched_bytes[source] if stats else 0)
    yield chunks
    yield nbytes
    for name, key, doc in (("local_tier_capacity_bytes", "capacity_bytes", "Size of the local tier (0: off)"),
                           ("local_tier_bytes", "bytes", "Compressed bytes the local tier holds"),
                           ("local_tier_chunks", "chunks", "Chunks the local tier holds")):
        yield GaugeMetricFamily(PREFIX + name, doc, value=tier.get(key, 0))
    for name, key, doc in (("local_tier_evictions", "evictions", "Chunks evicted from the local tier (LRU)"),
                           ("local_tier_corrupt", "corrupt", "Local tier entries that failed verification and "
                            "were dropped (refetched from the store)")):
        yield CounterMetricFamily(PREFIX + name, doc, value=tier.get(key, 0))


def _policy_metrics(policy):
    """Fetch-or-recompute decisions by outcome and reason, and the estimates they rest on."""
    decisions = CounterMetricFamily(PREFIX + "kv_decisions", "Lookups with a hit, by what was decided (fetch, "
                                    "partial, recompute) and why (measured, optimistic, policy)",
                                    labels=["decision", "reason"])
    counts = dict(policy.counts) if policy is not None else {}
    for decision in DECISIONS:
        for reason in REASONS:
            decisions.add_metric([decision, reason], counts.get((decision, reason), 0))
    yield decisions
    estimates = GaugeMetricFamily(PREFIX + "fetch_policy_estimate", "The policy's running estimates (absent "
                                  "until measured)", labels=["name"])
    for name, value in (policy.estimates().items() if policy is not None else ()):
        if value is not None:
            estimates.add_metric([name], value)
    yield estimates
