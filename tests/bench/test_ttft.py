"""``shadowserve bench ttft`` end to end on tiny-random: every row fetched its prefix, every point has its bound."""

from __future__ import annotations

import json
import subprocess
import sys


def test_bench_ttft_measures_a_bound_per_bandwidth(tmp_path):
    out = tmp_path / "ttft.json"
    p = subprocess.run([sys.executable, "-m", "shadowserve.cli", "bench", "ttft", "--model", "tiny-random",
                        "--prefix-tokens", "512", "--bandwidths", "1,20", "--modes", "thread,offload", "--batch", "2",
                        "--kv-cache-memory", "64MiB", "--repeats", "2", "--json", str(out)], capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    data = json.loads(out.read_text())
    points = {pt["bandwidth_gbps"]: pt for pt in data["points"]}
    assert sorted(points) == [1.0, 20.0]
    for pt in points.values():
        stages = pt["stages"]
        assert stages["chunks"] == 2 and stages["compressed_bytes"] > 0
        assert min(stages["decompress_s"], stages["dequantize_s"], stages["scatter_s"]) > 0
        slowest = max(stages["decompress_s"], stages["dequantize_s"], stages["scatter_s"])
        link = stages["compressed_bytes"] * 8 / (pt["bandwidth_gbps"] * 1e9)
        assert abs(pt["bound_ms"] - (max(link, slowest) * 1e3 + pt["suffix_prefill_ms"])) < 1e-6
        turns = stages["fetch_loopback_s"] + stages["decompress_s"] + stages["dequantize_s"]
        assert abs(pt["bound_one_core_ms"] - (max(link, turns) * 1e3 + pt["suffix_prefill_ms"])) < 1e-6
    rows = data["rows"]
    assert {(r["mode"], r["bandwidth_gbps"], r["loaded"]) for r in rows} == {
        (m, b, lo) for m in ("thread", "offload") for b in (1.0, 20.0) for lo in (False, True)}
    for r in rows:
        assert r["fetched_tokens"] == 512 and r["fetch_failures"] == 0
        assert r["bound_ms"] == points[r["bandwidth_gbps"]]["bound_ms"]
        assert len(r["ttft_samples_ms"]) == 2 and min(r["ttft_samples_ms"]) <= r["ttft_ms"] <= max(r["ttft_samples_ms"])
        # The request's own TTFT split: fetch, then the rest; both parts inside its TTFT.
        assert 0 < r["fetch_ms"] and 0 < r["after_fetch_ms"]
        assert r["fetch_ms"] + r["after_fetch_ms"] <= max(r["ttft_samples_ms"]) + 1e-6
        pt = points[r["bandwidth_gbps"]]
        assert abs(r["bound_same_request_ms"] - (pt["bound_ms"] - pt["suffix_prefill_ms"] + r["after_fetch_ms"])) < 1e-6
    # The 1 Gbit/s link is what limits there: the bound (and a real fetch) must respect it.
    slow = [r for r in rows if r["bandwidth_gbps"] == 1.0 and not r["loaded"]]
    assert all(r["ttft_ms"] >= points[1.0]["stages"]["compressed_bytes"] * 8 / 1e9 * 1e3 for r in slow)
