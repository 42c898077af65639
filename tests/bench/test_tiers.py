"""``shadowserve bench tiers --quick`` end to end on tiny-random: both parts run and write their numbers."""

from __future__ import annotations

import json
import subprocess
import sys


def test_bench_tiers_quick(tmp_path):
    out = tmp_path / "tiers.json"
    p = subprocess.run([sys.executable, "-m", "shadowserve.cli", "bench", "tiers", "--quick", "--json", str(out)],
                       capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    data = json.loads(out.read_text())
    reuse = data["reuse"]
    for key in ("ttft_ms_no_tier", "ttft_ms_tier", "ttft_ms_resident", "hit_ratio", "tokens_per_gib_tier",
                "tokens_per_gib_uncompressed"):
        assert reuse[key] > 0, key
    assert reuse["tier_ceiling"] == reuse["ttft_ms_no_tier"] / reuse["ttft_ms_resident"]
    assert "no tier can beat" in p.stdout  # the ceiling is printed beside the measured ratio
    assert reuse["tokens_per_gib_tier"] > 2 * reuse["tokens_per_gib_uncompressed"]  # compressed chunks pack denser
    sizes = reuse["hit_ratio_by_size"]
    assert sizes[0]["first"] <= sizes[-1]["first"]  # a tier holding the whole working set hits the most
    rates = [r["bandwidth_gbps"] for r in data["policy"]]
    assert rates == [0.01, 20.0]
    slow, fast = data["policy"]
    assert slow["decision"]["decision"] == "recompute" and fast["decision"]["decision"] == "fetch"
    for row in data["policy"]:
        assert min(row["ttft_fetch_ms"], row["ttft_recompute_ms"], row["ttft_policy_ms"]) > 0
