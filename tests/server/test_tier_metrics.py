"""/metrics shows the local tier and the fetch-or-recompute decisions (rendered from a live engine)."""

from __future__ import annotations

import re

from shadowserve.config import DataPlaneConfig, EngineConfig
from shadowserve.llm import create_engine
from shadowserve.server.metrics import ServerMetrics
from tests.dataplane.test_end_to_end import CHUNK, LOSSLESS, prompts, run


def value(text: str, name: str) -> float:
    m = re.search(rf"^shadowserve_{re.escape(name)} (\S+)$", text, re.M)
    assert m, f"{name} missing"
    return float(m.group(1))


def test_tier_and_decision_metrics(tiny, tmp_path):
    cfg = DataPlaneConfig(fetch_mode="thread", chunk_size=CHUNK, local_tier="1MiB")
    eng = create_engine(EngineConfig(model="tiny-random", kv_cache_memory="16MiB", enable_prefix_caching=False),
                        loaded=tiny, dataplane=cfg, store_url=f"file://{tmp_path}/store", codec=LOSSLESS)
    ps = prompts(2, seed=41)
    run(eng, ps[:1])  # computed and written through to the tier
    eng.flush()
    req = run(eng, ps[1:])[0]
    eng.flush()
    assert req.kv_decision["decision"] == "fetch" and req.kv_decision["tier_chunks"] == 200 // CHUNK
    text = ServerMetrics(eng).render().decode()
    chunks = 200 // CHUNK
    assert value(text, 'fetched_chunks_total{source="tier"}') == chunks
    assert value(text, 'fetched_chunks_total{source="store"}') == 0
    assert value(text, 'fetched_source_bytes_total{source="tier"}') > 0
    assert value(text, "local_tier_chunks") == chunks
    assert value(text, "local_tier_capacity_bytes") == 1 << 20
    assert 0 < value(text, "local_tier_bytes") < 1 << 20
    assert value(text, "local_tier_evictions_total") == 0
    assert value(text, 'kv_decisions_total{decision="fetch",reason="optimistic"}') == 1
    assert value(text, 'fetch_policy_estimate{name="decode_seconds_per_chunk"}') > 0
    eng.close()
