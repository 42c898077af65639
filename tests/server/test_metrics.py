"""``/metrics`` values move as requests run, under the names in DESIGN.md §3."""

from __future__ import annotations

import httpx

from tests.server.conftest import scrape


def test_metrics_move_with_requests(api_server):
    before = scrape(api_server.url)
    r = httpx.post(f"{api_server.url}/v1/completions", timeout=60,
                   json={"prompt": "Count these tokens.", "max_tokens": 5, "ignore_eos": True})
    assert r.status_code == 200
    usage = r.json()["usage"]
    after = scrape(api_server.url)

    def moved(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert moved('shadowserve_requests_total{state="finished"}') == 1
    assert moved("shadowserve_ttft_seconds_count") == 1
    assert moved("shadowserve_ttft_seconds_sum") > 0
    assert moved("shadowserve_tpot_seconds_count") == 1
    assert moved("shadowserve_prompt_tokens_total") == usage["prompt_tokens"]
    assert moved("shadowserve_generation_tokens_total") == 5
    bad = httpx.post(f"{api_server.url}/v1/completions", json={"prompt": "x", "max_tokens": -1})
    assert bad.status_code == 400
    assert scrape(api_server.url)['shadowserve_requests_total{state="rejected"}'] >= 1
    # Every DESIGN name is exported even without a store, so dashboards never see gaps.
    for name in ("shadowserve_prefix_lookup_tokens_total", 'shadowserve_prefix_hit_tokens_total{source="local"}',
                 'shadowserve_prefix_hit_tokens_total{source="remote"}', "shadowserve_store_hit_tokens_total",
                 "shadowserve_fetch_bytes_total", "shadowserve_fetch_seconds_count", 'shadowserve_fetch_seconds_bucket{le="0.1"}',
                 "shadowserve_fetch_failures_total", 'shadowserve_store_errors_total{kind="unreachable"}',
                 "shadowserve_kv_blocks_total"):
        assert name in after
    assert after["shadowserve_store_up"] == 1  # no store: nothing is down


def test_local_prefix_hits_are_not_counted_as_remote(api_server):
    prompt = "The same long preamble, reused by a second request word for word. " * 6
    first = httpx.post(f"{api_server.url}/v1/completions", timeout=60, json={"prompt": prompt, "max_tokens": 2})
    before = scrape(api_server.url)
    second = httpx.post(f"{api_server.url}/v1/completions", timeout=60, json={"prompt": prompt, "max_tokens": 2})
    after = scrape(api_server.url)
    assert first.status_code == second.status_code == 200
    cached = second.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached >= 16  # at least one block came from the engine's own prefix cache
    local, remote = (after[f'shadowserve_prefix_hit_tokens_total{{source="{s}"}}']
                     - before[f'shadowserve_prefix_hit_tokens_total{{source="{s}"}}'] for s in ("local", "remote"))
    assert (local, remote) == (cached, 0)
