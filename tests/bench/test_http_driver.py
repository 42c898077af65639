"""The HTTP driver against a real ``shadowserve serve`` on tiny-random: same records, same metrics."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from shadowserve.bench.common.drivers import RequestSpec
from shadowserve.bench.common.metrics import compute_metrics


@pytest.fixture(scope="module")
def api():
    pytest.importorskip("fastapi")
    from shadowserve.server.launch import start_api_server

    server = start_api_server("--model", "tiny-random", "--kv-cache-memory", "64MiB")
    yield server
    server.stop()


@pytest.mark.timeout(120)
def test_http_driver_streams_and_times_every_request(api):
    from shadowserve.bench.common.http_driver import HTTPDriver

    driver = HTTPDriver(api.url)
    assert driver.model
    specs = [RequestSpec(tuple(range(5, 40 + i)), 3 + i, arrival_s=0.05 * i) for i in range(3)]
    records = driver.run(specs, max_concurrency=2)
    assert len(records) == 3 and all(r.ok for r in records), [r.error for r in records]
    for spec, r in zip(specs, records):
        assert r.output_tokens == spec.max_tokens and r.prompt_tokens == len(spec.prompt_ids)
        assert r.start < r.first_token <= r.end and r.token_times == sorted(r.token_times)
    m = compute_metrics(records)
    assert m["completed"] == 3 and m["total_output_tokens"] == 3 + 4 + 5


@pytest.mark.timeout(120)
def test_http_driver_reports_rejections(api):
    from shadowserve.bench.common.http_driver import HTTPDriver

    records = HTTPDriver(api.url).run([RequestSpec((5,) * 5000, 4)])
    assert not records[0].ok and "HTTP 4" in records[0].error


@pytest.mark.timeout(180)
def test_bench_load_url(api, tmp_path):
    out = tmp_path / "load.json"
    p = subprocess.run([sys.executable, "-m", "shadowserve.cli", "bench", "load", "--url", api.url, "--model",
                        "tiny-random", "--workload", "prefix-repetition", "--num-prompts", "4", "--prefix-len", "300",
                        "--suffix-len", "20", "--num-prefixes", "2", "--output-len", "4", "--request-rate", "10",
                        "--json", str(out)], capture_output=True, text=True, timeout=170)
    assert p.returncode == 0, p.stderr[-2000:]
    m = json.loads(out.read_text())["modes"]["server"]
    assert m["completed"] == 4 and m["failed"] == 0 and m["total_output_tokens"] == 16
