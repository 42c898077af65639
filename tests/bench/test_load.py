"""The in-process driver and the load/paper commands, end to end on tiny-random."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from shadowserve.bench.common.drivers import RequestSpec
from shadowserve.bench.common.engine_driver import EngineDriver
from shadowserve.bench.common.metrics import compute_metrics


@pytest.fixture()
def engine(tiny):
    from shadowserve.config import EngineConfig
    from shadowserve.engine.engine import LLMEngine

    eng = LLMEngine(EngineConfig(model="tiny-random", kv_cache_memory="32MiB"), loaded=tiny, progress=False)
    yield eng
    eng.close()


def test_engine_driver_records_every_request(engine):
    specs = [RequestSpec(tuple(range(5, 45 + i)), 3 + i, arrival_s=0.05 * i) for i in range(4)]
    records = EngineDriver(engine).run(specs)
    assert len(records) == 4 and all(r.ok for r in records)
    t0 = records[0].start
    for spec, r in zip(specs, records):
        assert r.prompt_tokens == len(spec.prompt_ids) and r.output_tokens == spec.max_tokens
        assert r.start == pytest.approx(t0 + spec.arrival_s, abs=1e-6)  # starts at its arrival
        assert r.start < r.first_token == r.token_times[0] and r.token_times[-1] == r.end
        assert all(a <= b for a, b in zip(r.token_times, r.token_times[1:]))
    m = compute_metrics(records)
    assert m["completed"] == 4 and m["total_output_tokens"] == sum(s.max_tokens for s in specs)


def test_engine_driver_concurrency_limit_serializes(engine):
    specs = [RequestSpec(tuple(range(5, 30)), 4) for _ in range(3)]
    records = EngineDriver(engine).run(specs, max_concurrency=1)
    for a, b in zip(records, records[1:]):
        assert b.start >= a.end  # held back until the previous one finished, and timed from then


def test_engine_driver_reports_rejected_requests(engine):
    records = EngineDriver(engine).run([RequestSpec((5,) * 5000, 4), RequestSpec((5, 6, 7), 2)])
    assert not records[0].ok and "context" in records[0].error and records[1].ok
    m = compute_metrics(records)
    assert m["failed"] == 1 and m["completed"] == 1


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shadowserve.cli", "bench", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.timeout(180)
def test_bench_load_fetches_and_reports_vllm_names(tmp_path):
    out = tmp_path / "load.json"
    p = _cli("load", "--model", "tiny-random", "--modes", "thread", "--workload", "chat", "--num-conversations",
             "2", "--rounds", "2", "--system-tokens", "600", "--output-len", "4:6", "--request-rate", "20",
             "--goodput", "ttft:60000", "--kv-cache-memory", "64MiB", "--json", str(out))
    assert p.returncode == 0, p.stderr[-2000:]
    data = json.loads(out.read_text())
    m = data["modes"]["thread"]
    for key in ("completed", "failed", "duration", "request_throughput", "output_throughput", "total_token_throughput",
                "mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "p99_tpot_ms", "mean_itl_ms",
                "p99_itl_ms", "mean_e2el_ms", "p99_e2el_ms", "request_goodput"):
        assert key in m, key
    assert m["completed"] == 4 and m["failed"] == 0
    assert m["total_fetched_tokens"] >= 4 * 512  # every request found its (warmed) system prompt's chunks
    assert m["slo_attainment"] == 1.0
    assert "Mean TTFT (ms):" in p.stdout


@pytest.mark.timeout(300)
def test_bench_paper_quick_smoke(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "paper"
    p = _cli("paper", "--quick", "--model", "tiny-random", "--out", str(out), "--modes", "recompute,thread,offload",
             "--rates", "5,10", "--ttft-bandwidths", "1,40", "--load-bandwidths", "40", "--ref-bandwidth", "40",
             "--num-documents", "2", "--questions-per-doc", "1", "--doc-tokens", "600:800", "--output-len", "4:6",
             "--stage-tokens", "512", "--goodput", "ttft:60000", "tpot:60000", "--kv-cache-memory", "64MiB",
             "--passes", "2", "--baseline-cores", "both", timeout=290)
    assert p.returncode == 0, p.stderr[-2000:]
    for name in ("ttft_vs_bandwidth", "tpot_vs_rate", "throughput_vs_bandwidth", "stages"):
        assert (out / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
        assert json.loads((out / f"{name}.json").read_text())
    ttft = json.loads((out / "ttft_vs_bandwidth.json").read_text())
    assert [p["bandwidth_gbps"] for p in ttft["modes"]["offload"]] == [1, 40]
    thr = json.loads((out / "throughput_vs_bandwidth.json").read_text())
    assert all(pt["max_rate_meeting_slo"] == 10 for pts in thr["modes"].values() for pt in pts)  # generous SLOs
    runs = json.loads((out / "runs.json").read_text())["runs"]
    # Per pass, recompute: once per rate; thread, thread@engine, offload: 2 rates at 40 + 1 rate at 1 Gbit/s.
    assert sorted(r["pass"] for r in runs) == [0] * 11 + [1] * 11
    assert {r["mode"] for r in runs} == {"recompute", "thread", "thread@engine", "offload"}
    assert all(r["completed"] == 2 for r in runs)
    assert all(r["total_fetched_tokens"] > 0 for r in runs if r["mode"] != "recompute")
    summary = json.loads((out / "summary.json").read_text())
    assert "tpot_thread_over_offload" in summary["ratios"] and summary["machine_after"]["cpus"] >= 1
    assert "tpot_thread_engine_over_offload" in summary["ratios"]
    assert [(r["placement"], r["baseline"]) for r in summary["paper_table"]] == [("reserved", "thread"),
                                                                                  ("engine", "thread")]
    assert all(r["tpot_baseline_over_offload"] > 0 for r in summary["paper_table"])
    assert "side by side with the paper" in p.stdout
    assert summary["passes"] == 2 and len(summary["ratios_by_pass"]) == 2


def test_paper_grid_interleaves_modes():
    from shadowserve.bench.suites.paper import interleaved, plan_runs

    modes = ["recompute", "thread", "offload"]
    tasks = interleaved(plan_runs(modes, [1.0, 40.0], [40.0], [5.0, 10.0], 40.0), modes)
    assert tasks == [
        ("recompute", None, 5.0), ("thread", 1.0, 5.0), ("offload", 1.0, 5.0),
        ("thread", 40.0, 5.0), ("offload", 40.0, 5.0),
        ("recompute", None, 10.0), ("thread", 40.0, 10.0), ("offload", 40.0, 10.0),
    ]


def test_paper_passes_alternate_mode_order_and_take_medians():
    from shadowserve.bench.suites.paper import median_runs, passes_of, plan_runs

    modes = ["thread", "offload"]
    grid = passes_of(plan_runs(modes, [10.0], [10.0], [1.0], 10.0), modes, 3)
    assert [[t[0] for t in one] for one in grid] == [["thread", "offload"], ["offload", "thread"],
                                                     ["thread", "offload"]]
    key = ("offload", 10.0, 1.0)
    runs = {key: [{"mean_tpot_ms": 90.0, "slo_attainment": 1.0, "requests": ["a"], "pass": 0},
                  {"mean_tpot_ms": 150.0, "slo_attainment": 0.5, "requests": ["b"], "pass": 1},
                  {"mean_tpot_ms": 100.0, "slo_attainment": 0.75, "requests": ["c"], "pass": 2}]}
    merged = median_runs(runs)[key]
    assert merged["mean_tpot_ms"] == 100.0 and merged["slo_attainment"] == 0.75
    assert merged["requests"] == ["c"]  # non-numeric fields: from the median-TPOT pass
    assert merged["passes"] == 3 and "pass" not in merged


def test_baseline_mode_labels_name_their_placement():
    from shadowserve.bench.common.harness import split_mode
    from shadowserve.bench.suites.paper import expand_modes
    from shadowserve.errors import ConfigError

    assert split_mode("thread@engine") == ("thread", "engine") and split_mode("offload") == ("offload", None)
    for bad in ("offload@engine", "thread@gpu"):
        with pytest.raises(ConfigError):
            split_mode(bad)
    modes = ["recompute", "sync", "thread", "offload"]
    assert expand_modes(modes, "both") == ["recompute", "sync", "sync@engine", "thread", "thread@engine", "offload"]
    assert expand_modes(modes, "engine") == ["recompute", "sync@engine", "thread@engine", "offload"]
    assert expand_modes(modes, "reserved") == modes
