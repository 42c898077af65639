"""The load runner's HTTP driver against a live server, and ``bench http`` end to end on tiny-random."""

from __future__ import annotations

import json
import subprocess
import sys

from shadowserve.bench.drivers import RequestSpec
from shadowserve.bench.http_driver import HTTPDriver
from shadowserve.bench.metrics import compute_metrics


def test_http_driver_records_every_token(api_server):
    specs = [RequestSpec(tuple(range(5, 5 + 20 + i)), max_tokens=6 + i, arrival_s=0.05 * i) for i in range(6)]
    records = HTTPDriver(api_server.url, model="tiny-random").run(specs, max_concurrency=3)
    assert [r.ok for r in records] == [True] * 6, [r.error for r in records]
    assert [r.output_tokens for r in records] == [6 + i for i in range(6)]  # exact lengths (ignore_eos)
    for spec, r in zip(specs, records):
        assert r.prompt_tokens == len(spec.prompt_ids)
        assert r.start <= r.first_token <= r.token_times[-1] <= r.end
    m = compute_metrics(records, (99,))
    assert m["completed"] == 6 and m["total_output_tokens"] == sum(6 + i for i in range(6))


def test_http_driver_reports_failures_as_records(api_server):
    specs = [RequestSpec((1, 2, 3), max_tokens=10**6), RequestSpec((1, 2, 3), max_tokens=2)]
    records = HTTPDriver(api_server.url).run(specs)
    assert not records[0].ok and "400" in records[0].error
    assert records[1].ok and records[1].output_tokens == 2


def test_bench_http_smoke(tmp_path):
    out = tmp_path / "http.json"
    proc = subprocess.run(
        [sys.executable, "-m", "shadowserve.cli", "bench", "http", "--model", "tiny-random", "--num-prompts", "4",
         "--rounds", "1", "--prompt-len", "32", "--output-len", "8", "--max-concurrency", "4",
         "--kv-cache-memory", "64MiB", "--json", str(out)],
        capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["http_over_in_process"] > 0
    assert data["rounds"]["http"][0]["completed"] == 4 and data["rounds"]["in-process"][0]["completed"] == 4
