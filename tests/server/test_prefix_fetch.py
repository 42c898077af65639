"""A request whose prefix KV comes from the store, over HTTP, through the offload data plane."""

from __future__ import annotations

import os
import re
import signal
import time

import httpx
import pytest

from shadowserve.bench.common.proc_tree import dataplane_pid
from shadowserve.server.launch import start_api_server
from shadowserve.store.launch import start_store_server
from tests.server.conftest import scrape

CHUNK = 64


@pytest.fixture(scope="module")
def store():
    s = start_store_server("--capacity", "256MiB")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def fetching_server(store):
    # Local prefix caching off: a repeated prompt must come back from the store, not from local blocks.
    s = start_api_server(
        "--model", "tiny-random", "--store", store.url, "--fetch-mode", "offload", "--quant", "none",
        "--lossless", "zstd", "--set", f"dataplane.chunk_size={CHUNK}", "--set", "engine.enable_prefix_caching=false",
        "--set", "dataplane.heartbeat_timeout=2",
        "--set", "dataplane.fetch_policy=always",  # every store hit fetched: on tiny-random computing is as cheap
    )
    yield s
    s.stop()


def _wait(predicate, timeout: float = 30.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_second_request_fetches_its_prefix_and_answers_the_same(fetching_server):
    openai = pytest.importorskip("openai", reason="the openai client is a test dependency")
    url = fetching_server.url
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
    prompt = "A shared document prefix that many requests repeat. " * 12  # ~600 byte tokens: 9 chunks
    first = client.completions.create(model="tiny-random", prompt=prompt, max_tokens=12, temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    _wait(lambda: scrape(url)["shadowserve_saved_chunks_total"] >= len(prompt) // CHUNK - 1, what="saves")
    before = scrape(url)
    second = client.completions.create(model="tiny-random", prompt=prompt, max_tokens=12, temperature=0)
    after = scrape(url)
    fetched = second.model_extra["shadowserve"]["fetched_tokens"]
    assert fetched >= CHUNK and fetched % CHUNK == 0
    # The TTFT breakdown: only the second request fetched, and its fetch is a part of its TTFT.
    assert first.model_extra["shadowserve"]["fetch_ms"] == [None]
    (fetch_ms,), (ttft_ms,) = second.model_extra["shadowserve"]["fetch_ms"], second.model_extra["shadowserve"]["ttft_ms"]
    assert 0 < fetch_ms < ttft_ms
    assert second.usage.prompt_tokens_details.cached_tokens == fetched
    assert second.choices[0].text == first.choices[0].text  # lossless codec: same answer
    hits = {s: after[f'shadowserve_prefix_hit_tokens_total{{source="{s}"}}']
            - before[f'shadowserve_prefix_hit_tokens_total{{source="{s}"}}'] for s in ("local", "remote")}
    assert hits == {"local": 0, "remote": fetched}  # prefix caching is off here: every hit was fetched
    assert after["shadowserve_store_hit_tokens_total"] - before["shadowserve_store_hit_tokens_total"] >= fetched
    assert after["shadowserve_fetch_bytes_total"] > before["shadowserve_fetch_bytes_total"]
    assert after["shadowserve_fetch_seconds_count"] == before["shadowserve_fetch_seconds_count"] + 1
    assert "shadowserve_dataplane_stage_busy_ratio{stage=\"fetch\"}" in after


def test_dead_data_plane_is_reported_and_replaced(fetching_server):
    url = fetching_server.url
    before = scrape(url)["shadowserve_dataplane_restarts_total"]
    pid = dataplane_pid(fetching_server.pid)
    assert pid is not None, "no data-plane child process found"
    os.kill(pid, signal.SIGKILL)
    # Idle, the server notices within a heartbeat timeout: /health says 503, then it restarts the plane.
    # The restart does not stall the server: while the new process starts (1-3 s) /health answers 200
    # "degraded" (requests compute their prefixes), then "ok".
    _wait(lambda: httpx.get(f"{url}/health").status_code == 503, timeout=10, what="/health to report the dead plane")
    _wait(lambda: scrape(url)["shadowserve_dataplane_restarts_total"] > before, timeout=15, what="a restart")
    seen = []
    _wait(lambda: seen.append(httpx.get(f"{url}/health").json()) or seen[-1]["status"] == "ok", timeout=15,
          what="/health to recover")
    assert any("the data plane is restarting" in r for h in seen for r in h.get("reasons", [])), seen
    log = _server_log(fetching_server)
    assert re.search(r"data plane down \(process \d+ was killed by SIGKILL\)", log), log[-2000:]
    assert re.search(r"data plane restarting \(process \d+ on cores", log), log[-2000:]
    assert re.search(r"data plane ready again after [\d.]+ s \(process \d+ on cores", log), log[-2000:]
    prompt = "A shared document prefix that many requests repeat. " * 12
    r = httpx.post(f"{url}/v1/completions", json={"prompt": prompt, "max_tokens": 4}, timeout=60)
    assert r.status_code == 200 and r.json()["shadowserve"]["fetched_tokens"] > 0  # the new plane fetches


def _server_log(server) -> str:
    with open(f"{server.workdir}/server.log") as f:
        return f.read()
