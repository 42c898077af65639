"""The local tier end to end on tiny-random: tier hits, corrupt tier entries, a killed data plane.

With a lossless codec every output must equal recompute's, wherever the chunks came from.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from shadowserve.config import DataPlaneConfig, EngineConfig
from shadowserve.engine.engine import LLMEngine
from shadowserve.engine.request import RequestStatus
from shadowserve.llm import create_engine
from tests.dataplane import test_end_to_end as e2e
from tests.dataplane.test_end_to_end import CHUNK, GREEDY, LOSSLESS, prompts, run, wait_ready, warm_store

reference = e2e.reference  # the recompute outputs fixture, shared


def tier_engine(tiny, url: str, mode: str, **plane) -> LLMEngine:
    """No local prefix cache, so a repeated prompt goes back to the remote tiers every time."""
    cfg = DataPlaneConfig(fetch_mode=mode, chunk_size=CHUNK, heartbeat_interval=0.2, heartbeat_timeout=3.0,
                          local_tier="1MiB", fetch_policy="always", **plane)
    return create_engine(EngineConfig(model="tiny-random", kv_cache_memory="16MiB", enable_prefix_caching=False),
                         loaded=tiny, dataplane=cfg, store_url=url, codec=LOSSLESS)


def tier_stats(eng: LLMEngine) -> dict:
    deadline = time.monotonic() + 10
    while not (stats := eng.kv_manager.backend.stats().get("local_tier")) and time.monotonic() < deadline:
        time.sleep(0.05)  # offload: the numbers come with the next heartbeat, taken by a poll
        eng.check_liveness()
    return stats


@pytest.mark.parametrize("mode", ["sync", "thread", "offload"])
def test_tier_hits_give_identical_tokens(tiny, reference, tmp_path, mode):
    url = f"file://{tmp_path}/store"
    ps = prompts(2, seed=11)
    warm_store(tiny, url, ps[:1])
    eng = tier_engine(tiny, url, mode)
    first = run(eng, ps[:1])  # from the store; admitted to the tier on this first fetch
    eng.flush()
    second = run(eng, ps[1:])  # same document: from the tier, no network
    eng.flush()
    assert [r.output_token_ids for r in first + second] == reference(ps)
    stats = eng.kv_manager.stats
    chunks = 200 // CHUNK
    assert stats.fetched_chunks == {"store": chunks, "tier": chunks}, stats
    assert stats.fetched_bytes["tier"] == stats.fetched_bytes["store"] > 0
    assert second[0].num_fetched_tokens == chunks * CHUNK
    assert len(eng.kv_manager.tier) == chunks
    assert tier_stats(eng)["chunks"] == chunks
    eng.close()


def test_saves_write_through_to_the_tier_and_the_store(tiny, reference, tmp_path):
    url = f"file://{tmp_path}/store"
    ps = prompts(2, seed=12)
    eng = tier_engine(tiny, url, "thread")
    run(eng, ps[:1])  # computed, then saved to the store and the tier
    eng.flush()
    assert eng.kv_manager.backend.pipeline.tier.stats()["chunks"] == 200 // CHUNK
    again = run(eng, ps[1:])
    assert [r.output_token_ids for r in again] == reference(ps[1:])
    assert eng.kv_manager.stats.fetched_chunks == {"tier": 200 // CHUNK, "store": 0}
    eng.close()
    assert any((tmp_path / "store").rglob("*"))  # and the store holds them too


def test_corrupt_tier_entry_is_dropped_and_refetched_from_the_store(tiny, reference, tmp_path):
    url = f"file://{tmp_path}/store"
    ps = prompts(2, seed=13)
    eng = tier_engine(tiny, url, "thread")
    run(eng, ps[:1])
    eng.flush()
    tier = eng.kv_manager.backend.pipeline.tier
    victim = eng.kv_manager.key_fn(ps[1])[2]  # the third chunk of the shared document
    page = tier.view(victim)[0]
    page[len(page) // 2] ^= 0xFF  # flip one byte of the tier's copy in place
    again = run(eng, ps[1:])
    assert [r.output_token_ids for r in again] == reference(ps[1:])
    stats = eng.kv_manager.stats
    assert tier.corrupt == 1 and stats.fetch_failures == 0
    assert stats.fetched_chunks == {"tier": 200 // CHUNK - 1, "store": 1}  # the bad one came from the store
    assert again[0].num_fetched_tokens == 200 // CHUNK * CHUNK
    eng.flush()
    assert victim in tier  # admitted again from the store: a good copy
    eng.close()


def test_killed_dataplane_loses_the_tier_and_nothing_else(tiny, reference, tmp_path):
    url = f"file://{tmp_path}/store"
    ps = prompts(3, seed=14)
    eng = tier_engine(tiny, url, "offload")
    run(eng, ps[:1])
    eng.flush()
    assert tier_stats(eng)["chunks"] == 200 // CHUNK
    backend = eng.kv_manager.backend
    os.kill(backend.process.pid, signal.SIGKILL)
    later = run(eng, ps[1:])  # one may lose its fetch to the restart and compute; both complete
    assert [r.output_token_ids for r in later] == reference(ps[1:])
    assert eng.kv_manager.stats.dataplane_restarts == 1 and backend.healthy()
    eng.flush()
    wait_ready(eng)
    last = run(eng, ps[2:])
    assert [r.output_token_ids for r in last] == reference(ps[2:])
    assert last[0].num_fetched_tokens == 200 // CHUNK * CHUNK  # the store still had everything
    eng.close()


def test_a_corrupt_store_chunk_never_enters_the_tier(tiny, reference, tmp_path):
    """Store-fetched chunks are admitted only once decompress has verified them."""
    url = f"file://{tmp_path}/store"
    ps = prompts(1, seed=15)
    warm_store(tiny, url, ps)
    for f in (p for p in (tmp_path / "store").rglob("*") if p.is_file()):  # flip a byte of every stored chunk
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 0xFF
        f.write_bytes(bytes(data))
    eng = tier_engine(tiny, url, "thread", save=False)  # no save: nothing good overwrites what was admitted
    reqs = run(eng, ps)
    assert [r.output_token_ids for r in reqs] == reference(ps) and reqs[0].num_fetched_tokens == 0
    tier = eng.kv_manager.backend.pipeline.tier
    assert tier.stats()["chunks"] == 0 and len(eng.kv_manager.tier) == 0
    eng.close()


def test_a_lookup_the_tier_answers_alone_says_nothing_of_the_store(tiny, reference):
    """With the store gone, a prefix the tier holds is still fetched, and the store stays reported down."""
    from shadowserve.store.launch import start_store_server

    server = start_store_server()
    try:
        ps = prompts(2, seed=16)
        eng = tier_engine(tiny, server.url, "thread", store_probe_interval=0.5)
        run(eng, ps[:1])  # computed and saved: into the store and the tier
        eng.flush()
        server.stop()
        health = eng.kv_manager.store_health
        deadline = time.monotonic() + 20
        while health.up is not False:  # the probes notice the store is gone
            assert time.monotonic() < deadline, "the store was never reported down"
            eng.check_liveness()
            time.sleep(0.05)
        again = run(eng, ps[1:])
        assert [r.output_token_ids for r in again] == reference(ps[1:])
        assert again[0].num_fetched_tokens == 200 // CHUNK * CHUNK  # every chunk from the tier
        assert health.up is False  # the tier answering is not the store answering
        eng.close()
    finally:
        server.stop()


def test_a_prefix_the_tier_holds_whole_needs_no_lookup_round_trip(tiny, reference, tmp_path):
    """The tier directory is local: such a request starts fetching in the step it arrives in, even with
    every lookup worker busy; a prefix that needs the store waits for a worker (the control)."""
    url = f"file://{tmp_path}/store"
    ps = prompts(2, seed=17)
    other = prompts(1, seed=18)[0]
    eng = tier_engine(tiny, url, "thread", lookup_workers=1)
    run(eng, ps[:1])  # computed, then saved to the store and the tier
    eng.flush()
    gate = threading.Event()
    eng.kv_manager._lookup_pool.submit(gate.wait)  # the only lookup worker is taken
    try:
        held = eng.add_request(ps[1], GREEDY)
        eng.step()
        assert held.status != RequestStatus.WAITING  # fetching from the tier (or already done)
        stored = eng.add_request(other, GREEDY)
        eng.step()
        assert stored.status == RequestStatus.WAITING  # its lookup is queued behind the busy worker
    finally:
        gate.set()
    deadline = time.monotonic() + 60
    while eng.has_unfinished():
        assert time.monotonic() < deadline, "requests hung"
        eng.step()
    assert [held.output_token_ids, stored.output_token_ids] == reference([ps[1], other])
    assert held.num_fetched_tokens == 200 // CHUNK * CHUNK
    assert eng.kv_manager.stats.fetched_chunks["tier"] == 200 // CHUNK
    eng.close()
