"""The pipeline's counters move with the work: chunks per stage, busy time, occupancy over time, waits."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from shadowserve.config import CodecConfig, DataPlaneConfig
from shadowserve.dataplane.buffers import SlotPool
from shadowserve.dataplane.messages import FetchCommand
from shadowserve.dataplane.pipeline import Pipeline
from shadowserve.dataplane.spec import buffer_layout
from shadowserve.kvcache.codec import KVCodec
from shadowserve.store.memory import MemoryStore

LAYERS, HEADS, DIM, BS, CHUNK = 2, 2, 8, 16, 32


def test_slot_pool_time_weighted_occupancy_peak_and_waits():
    pool = SlotPool("t", 2, 64)
    try:
        pool.reset_window()
        a = pool.acquire(1)
        time.sleep(0.2)  # one of two slots busy the whole window
        w = pool.window()
        assert 0.4 < w["mean_occupancy"] <= 0.52 and w["peak_in_use"] == 1 and w["wait_s"] == 0
        b = pool.acquire(1)
        threading.Timer(0.15, pool.release, args=(a,)).start()
        c = pool.acquire(2)  # both busy: waits until the timer frees one
        w = pool.window()
        assert w["peak_in_use"] == 2 and 0.1 < w["wait_s"] < 1.0
        pool.release(b)
        pool.release(c)
        pool.reset_window()
        time.sleep(0.05)
        w = pool.window()
        assert w["mean_occupancy"] == 0 and w["peak_in_use"] == 0 and w["wait_s"] == 0
    finally:
        pool.close()


def test_pipeline_counts_each_stage_and_resets():
    pool = torch.zeros(LAYERS, 2, 40, BS, HEADS, DIM)
    codec = KVCodec(CodecConfig(quant="none", lossless="zstd"), "fp")
    cfg = DataPlaneConfig(fetch_mode="thread", chunk_size=CHUNK, receive_slots=2, staging_slots=1, kv_slots=1)
    store = MemoryStore()
    pipe = Pipeline(cfg, store, codec, pool, buffer_layout((LAYERS, 2, CHUNK, HEADS, DIM), 4, codec))
    try:
        keys = tuple(b"k%d" % i for i in range(4))
        for k in keys:
            store.put(k, codec.encode(torch.randn(LAYERS, 2, CHUNK, HEADS, DIM)))
        dest = ((0, 1), (2, 3), (9, 5), (6, 7))  # one scattered chunk
        done = threading.Event()
        pipe.submit(FetchCommand(1, "r", keys, dest), lambda c: done.set())
        assert done.wait(30)
        st = pipe.stats()
        assert st["stage_chunks"]["fetch"] == 4 and st["stage_chunks"]["decompress"] == 4
        assert st["stage_chunks"]["dequantize"] == 4 and st["stage_chunks"]["scatter"] == 1
        assert st["fetched_bytes"] == sum(len(store.get(k)) for k in keys)
        assert all(st["stage_busy_seconds"][s] > 0 for s in ("fetch", "decompress", "dequantize", "scatter"))
        assert st["stage_busy_seconds"]["save"] == 0
        win = st["buffer_window"]
        assert win["receive"]["peak_in_use"] >= 1 and win["receive"]["mean_occupancy"] > 0
        assert win["staging"]["peak_in_use"] == 1
        pipe.reset_stats()
        st = pipe.stats()
        assert all(v == 0 for v in st["stage_chunks"].values()) and st["fetched_bytes"] == 0
        assert all(v == 0 for v in st["stage_busy_seconds"].values())
        assert all(w["peak_in_use"] == 0 for w in st["buffer_window"].values())
    finally:
        pipe.close()


@pytest.mark.timeout(120)
def test_stage_measure_on_tiny_random(tiny, tmp_path):
    """bench stages end to end on tiny-random: real store server, real chunks, counters consistent."""
    from shadowserve.bench.common.harness import Harness, doc_prompt
    from shadowserve.bench.suites import stages
    from shadowserve.store.launch import start_store_server

    with start_store_server("--capacity", "256MiB") as server:
        h = Harness(tiny, server.url, CodecConfig(), kv_cache_memory="64MiB")
        prompt = doc_prompt(tiny.tokenizer, 4 * 256, offset=0)
        h.warm([prompt])
        r = stages.measure(h, prompt, repeats=2, scattered=True)
    assert r["chunks"] == 4 and r["path"] == ["fetch", "decompress", "dequantize", "scatter"]
    for s in r["path"]:
        assert r["alone"][s]["gbps"] > 0 and r["inside"][s]["chunks"] == 2 * 4
        assert 0 < r["inside"][s]["busy_s"] <= r["pipelined"]["wall_s"] * 2 + 0.05  # fetch has 2 workers
    assert r["pipelined"]["chunks_per_s"] == pytest.approx(8 / r["pipelined"]["wall_s"])
    # A stage's ceiling: its one-thread rate times its workers, but never more workers than cores.
    cores = len(r["dataplane_cores"])
    assert r["stage_workers"] == {"fetch": 2, "decompress": 1, "dequantize": 1, "scatter": 1}
    assert r["stage_capacity_gbps"] == {s: r["alone"][s]["gbps"] * min(r["stage_workers"][s], cores)
                                        for s in r["path"]}
    assert r["efficiency"] == pytest.approx(
        r["pipelined"]["gbps"] / r["stage_capacity_gbps"][r["slowest_alone"]])
    assert r["timeline"] and all(0 <= p["in_use"]["receive"] <= 8 for p in r["timeline"])
