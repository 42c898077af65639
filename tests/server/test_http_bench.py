"""``bench http`` end to end on tiny-random (the HTTP driver itself is tested in tests/bench)."""

from __future__ import annotations

import json
import subprocess
import sys


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
