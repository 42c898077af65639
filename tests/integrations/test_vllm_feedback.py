"""The vLLM scheduler side learns from the worker: fetch-or-recompute and the tier mirror inside vLLM.

vLLM's scheduler process never sees a fetch: the worker's data plane runs them. What the worker sends
back each step (``ShadowServeWorkerMeta``: the steps it ran and its data plane's completions) must give
the scheduler side's lookup manager the same estimates our own engine has, so a slow link makes a
lookup answer "compute it" and a fast one "fetch it", and a tier hit is known without asking the store.
Here the scheduler side runs against a real store server; vLLM's request and scheduler-output objects
are stood in for by the few fields the connector reads, and the worker's answers carry completions
shaped like the data plane's. Steps really take the time they report (the side times them itself).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from types import SimpleNamespace

import pytest

pytest.importorskip("vllm", reason="the vLLM connector needs the vllm extra: pip install -e '.[vllm]'")

from shadowserve.controlplane.builder import build_lookup_manager  # noqa: E402
from shadowserve.dataplane.messages import Completion  # noqa: E402
from shadowserve.integrations.vllm.config import parse_extra_config  # noqa: E402
from shadowserve.integrations.vllm.metadata import ShadowServeWorkerMeta  # noqa: E402
from shadowserve.integrations.vllm.scheduler_side import NoBlocks, SchedulerSide  # noqa: E402
from shadowserve.integrations.vllm.stats import CounterDelta  # noqa: E402
from shadowserve.store import open_store  # noqa: E402
from shadowserve.store.launch import start_store_server  # noqa: E402

BLOCK, CHUNK = 128, 256
CHUNK_BYTES = 200_000
STEP_S_PER_TOKEN = 40e-6  # the prefill cost these steps really take (sleep), about a 135M model on a CPU core


@dataclass
class Req:
    """The fields of vLLM's ``Request`` the scheduler side reads."""

    request_id: str
    prompt_token_ids: list[int]
    num_computed_tokens: int = 0
    num_preemptions: int = 0
    cache_salt: str | None = None


@pytest.fixture(scope="module")
def store_url():
    srv = start_store_server()
    yield srv.url
    srv.stop()


def _side(store_url: str) -> SchedulerSide:
    config = parse_extra_config({"store_url": store_url, "chunk_size": CHUNK, "quant": "none",
                                 "fetch_policy": "auto"}, BLOCK)
    manager = build_lookup_manager(config.dataplane, store_url, config.codec, "test:feedback", NoBlocks(BLOCK))
    return SchedulerSide(config, BLOCK, manager)


def _matched(side: SchedulerSide, req: Req) -> int:
    deadline = time.monotonic() + 10
    while (got := side.get_num_new_matched_tokens(req, 0)[0]) is None:  # the lookup runs on a pool
        assert time.monotonic() < deadline
        time.sleep(0.005)
    return got


def _prefill_steps(side: SchedulerSide, lengths: list[int]) -> None:
    """Misses of these lengths prefilled one step each, each taking its cost in real time."""
    for i, n in enumerate(lengths):
        req = Req(f"miss-{n}-{i}", [1000 + i] * n)
        assert _matched(side, req) == 0
        out = SimpleNamespace(num_scheduled_tokens={req.request_id: n}, total_num_scheduled_tokens=n,
                              preempted_req_ids=set())
        meta = side.build_connector_meta(out)
        time.sleep(0.001 + n * STEP_S_PER_TOKEN)
        side.update_connector_output(SimpleNamespace(kv_connector_worker_meta=ShadowServeWorkerMeta([meta.step])))
        side.request_finished(req, [])


def _fetched(chunks: int, link_bytes_per_s: float, tier_events=()) -> Completion:
    wire = chunks * CHUNK_BYTES / link_bytes_per_s
    return Completion(0, "r", "fetch", chunks, chunks, nbytes=chunks * CHUNK_BYTES, seconds=wire + 0.002,
                      stage_seconds={"decompress": 0.001 * chunks, "dequantize": 0.0005 * chunks},
                      store_bytes=chunks * CHUNK_BYTES, store_seconds=wire, tier_events=list(tier_events))


@pytest.mark.parametrize("link, expect_fetch", [(2e6, False), (2e9, True)], ids=["slow-link", "fast-link"])
def test_lookup_fetches_or_recomputes_by_what_the_worker_measured(store_url, link, expect_fetch):
    side = _side(store_url)
    doc = list(range(5, 5 + 3 * CHUNK))
    keys = side.manager.key_fn(doc)
    store = open_store(store_url)
    for k in keys:
        store.put(k, b"chunk")  # lookups only ask whether a chunk is there
    store.close()
    try:
        optimistic = _matched(side, Req("before", doc + [1, 2, 3]))
        assert optimistic == 3 * CHUNK  # no estimates yet: the store's hit is fetched
        _prefill_steps(side, [64, 128, 256, 384, 512, 768, 96])
        meta = ShadowServeWorkerMeta([], [_fetched(2, link) for _ in range(12)])
        side.update_connector_output(SimpleNamespace(kv_connector_worker_meta=meta))
        est = side.manager.policy.estimates()
        assert est["link_bytes_per_second"] == pytest.approx(link, rel=0.01)
        assert est["prefill_seconds_per_token"] is not None  # the steps timed here were fitted
        hit = _matched(side, Req("after", doc + [1, 2, 3]))
        decision = side.manager.policy.decision("after")
        assert (hit == 3 * CHUNK) if expect_fetch else (hit == 0), decision
        assert decision.reason == "measured"
    finally:
        side.close()


def test_the_tier_mirror_follows_the_workers_tier_and_its_restarts(store_url):
    side = _side(store_url)
    try:
        keys = side.manager.key_fn(list(range(7, 7 + 2 * CHUNK)))
        admitted = ShadowServeWorkerMeta([], [_fetched(2, 1e9, [(k, True) for k in keys])], restarts=0)
        side.update_connector_output(SimpleNamespace(kv_connector_worker_meta=admitted))
        assert all(k in side.manager.tier for k in keys)
        side.update_connector_output(SimpleNamespace(kv_connector_worker_meta=ShadowServeWorkerMeta([], [], 0)))
        assert all(k in side.manager.tier for k in keys)  # nothing changed
        side.update_connector_output(SimpleNamespace(kv_connector_worker_meta=ShadowServeWorkerMeta([], [], 1)))
        assert not any(k in side.manager.tier for k in keys)  # the worker's data plane restarted: its tier is gone
        side.update_connector_output(SimpleNamespace(kv_connector_output=None))  # another connector's output: ignored
    finally:
        side.close()


def test_worker_answers_aggregate_across_workers():
    a = ShadowServeWorkerMeta([3], [_fetched(1, 1e9)], restarts=1)
    b = ShadowServeWorkerMeta([3], [_fetched(2, 1e9)], restarts=2, starting=True)
    both = a.aggregate(b)
    assert both.steps == [3, 3] and [c.ok_chunks for c in both.completions] == [1, 2] and both.restarts == 2
    assert both.starting and not a.aggregate(a).starting  # any worker still starting counts


def test_no_loads_while_the_workers_data_plane_restarts(store_url):
    """While the worker says its restarted data plane is starting, hits are computed (a load would be
    refused) and nothing is handed over to save; once it is ready, hits load again."""
    side = _side(store_url)
    doc = list(range(9, 9 + 2 * CHUNK))
    store = open_store(store_url)
    for k in side.manager.key_fn(doc):
        store.put(k, b"chunk")
    store.close()
    side.kv_cache_manager = SimpleNamespace(get_block_ids=lambda rid: ([0] * (2 * CHUNK // BLOCK + 1),))
    try:
        restarting = ShadowServeWorkerMeta([], [], restarts=1, starting=True)
        side.update_connector_output(SimpleNamespace(kv_connector_worker_meta=restarting))
        req = Req("during", doc + [1, 2, 3])
        assert side.get_num_new_matched_tokens(req, 0) == (0, False)
        out = SimpleNamespace(num_scheduled_tokens={req.request_id: len(req.prompt_token_ids)},
                              total_num_scheduled_tokens=len(req.prompt_token_ids), preempted_req_ids=set())
        assert side.build_connector_meta(out).saves == []
        side.request_finished(req, [])
        ready = ShadowServeWorkerMeta([], [], restarts=1, starting=False)
        side.update_connector_output(SimpleNamespace(kv_connector_worker_meta=ready))
        assert _matched(side, Req("after", doc + [1, 2, 3])) == 2 * CHUNK  # optimistic: no estimates yet
    finally:
        side.close()


def test_decisions_and_hits_reach_vllms_kv_transfer_log_line(store_url):
    from vllm.config import KVTransferConfig
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorLogging

    side = _side(store_url)
    try:
        doc = list(range(9, 9 + 2 * CHUNK))
        store = open_store(store_url)
        for k in side.manager.key_fn(doc):
            store.put(k, b"chunk")
        store.close()
        deltas = CounterDelta(side.manager)
        assert _matched(side, Req("a", doc + [1])) == 2 * CHUNK  # no estimates yet: fetched
        first = deltas.take()
        assert first.data["decisions_fetch_optimistic"] == 1 and first.data["prefix_hit_tokens"] == 2 * CHUNK
        assert deltas.take() is None  # nothing new since
        assert _matched(side, Req("b", doc + [2])) == 2 * CHUNK
        second = deltas.take()
        # vLLM's own logger rebuilds our stats through the connector class, sums the intervals' and prints them.
        kvt = KVTransferConfig(kv_connector="ShadowServeConnector", kv_connector_module_path="shadowserve.integrations.vllm",
                               kv_role="kv_both")
        logging = KVConnectorLogging(kvt)
        logging.observe(first.data)
        logging.observe(second.data)
        lines = []
        logging.log(log_fn=lambda fmt, *args: lines.append(fmt % args))
        assert len(lines) == 1 and "decisions_fetch_optimistic=2" in lines[0] and f"prefix_hit_tokens={4 * CHUNK}" in lines[0]
    finally:
        side.close()


def test_counters_become_vllm_prometheus_counters():
    from functools import partial

    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

    from shadowserve.integrations.vllm.connector import ShadowServeConnector

    registry = CollectorRegistry()
    types = {t: partial(t, registry=registry) for t in (Counter, Gauge, Histogram)}
    prom = ShadowServeConnector.build_prom_metrics(SimpleNamespace(kv_transfer_config=None), types, ["model_name", "engine"], {0: ["m", "0"]})
    prom.observe({"decisions_recompute_measured": 3, "decisions_fetch_optimistic": 1, "prefix_hit_tokens": 512,
                  "fetched_chunks_tier": 2, "fetched_bytes_store": 1000, "fetch_failures": 0})
    prom.observe({"decisions_recompute_measured": 1})
    value = registry.get_sample_value
    labels = {"model_name": "m", "engine": "0"}
    assert value("vllm:shadowserve_decisions_total", {**labels, "decision": "recompute", "reason": "measured"}) == 4
    assert value("vllm:shadowserve_decisions_total", {**labels, "decision": "fetch", "reason": "optimistic"}) == 1
    assert value("vllm:shadowserve_prefix_hit_tokens_total", labels) == 512
    assert value("vllm:shadowserve_fetched_chunks_total", {**labels, "source": "tier"}) == 2
    assert value("vllm:shadowserve_fetched_bytes_total", {**labels, "source": "store"}) == 1000
