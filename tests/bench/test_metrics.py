"""Metrics arithmetic on hand-made timelines: every number below is worked out from the timestamps."""

from __future__ import annotations

import math

import pytest

from shadowserve.bench.common.drivers import RequestRecord
from shadowserve.bench.common.metrics import (
    compute_metrics,
    format_table,
    max_rate_meeting_slo,
    meets_slos,
    parse_goodput,
    percentile,
)
from shadowserve.errors import ConfigError


def rec(start, times, prompt=10, ok=True):
    return RequestRecord(start=start, prompt_tokens=prompt, ok=ok, first_token=times[0] if times else None,
                         token_times=list(times), end=times[-1] if times else start, output_tokens=len(times))


def test_percentile_interpolates_between_ranks():
    xs = [4.0, 1.0, 3.0, 2.0]
    assert percentile(xs, 0) == 1.0 and percentile(xs, 100) == 4.0
    assert percentile(xs, 50) == pytest.approx(2.5)
    assert percentile(xs, 99) == pytest.approx(3 + 0.97)
    assert math.isnan(percentile([], 50))
    with pytest.raises(ValueError):
        percentile(xs, 101)


def test_latencies_and_throughputs_from_known_timestamps():
    # A: starts at 0, tokens at 1.0, 1.5, 2.0 -> TTFT 1.0, TPOT 0.5, ITLs 0.5 0.5, E2EL 2.0
    # B: starts at 1, tokens at 1.2, 2.0     -> TTFT 0.2, TPOT 0.8, ITL 0.8, E2EL 1.0
    # C: failed; counted as failed, excluded from latencies and tokens
    records = [rec(0.0, [1.0, 1.5, 2.0], prompt=100), rec(1.0, [1.2, 2.0], prompt=50),
               RequestRecord(start=0.5, prompt_tokens=70, ok=False, error="boom", end=0.6)]
    m = compute_metrics(records, percentiles=(50, 99))
    assert m["completed"] == 2 and m["failed"] == 1
    assert m["duration"] == pytest.approx(2.0)  # first start 0.0 -> last end 2.0
    assert m["total_input_tokens"] == 150 and m["total_output_tokens"] == 5
    assert m["request_throughput"] == pytest.approx(1.0)
    assert m["output_throughput"] == pytest.approx(2.5)
    assert m["total_token_throughput"] == pytest.approx(77.5)
    assert m["mean_ttft_ms"] == pytest.approx(600) and m["median_ttft_ms"] == pytest.approx(600)
    assert m["p99_ttft_ms"] == pytest.approx(200 + 800 * 0.99)
    assert m["mean_tpot_ms"] == pytest.approx(650)
    assert m["mean_itl_ms"] == pytest.approx(1800 / 3) and m["median_itl_ms"] == pytest.approx(500)
    assert m["mean_e2el_ms"] == pytest.approx(1500) and m["p50_e2el_ms"] == pytest.approx(1500)
    assert m["std_ttft_ms"] == pytest.approx(400)
    assert "request_goodput" not in m
    text = format_table(m)
    assert "Mean TTFT (ms):" in text and "P99 ITL (ms):" in text


def test_single_token_requests_have_no_tpot():
    m = compute_metrics([rec(0.0, [0.3])])
    assert m["mean_ttft_ms"] == pytest.approx(300)
    assert math.isnan(m["mean_tpot_ms"]) and math.isnan(m["mean_itl_ms"])


def test_goodput_counts_requests_within_every_slo():
    slos = parse_goodput(["ttft:500", "tpot:600"])
    assert slos == {"ttft": 0.5, "tpot": 0.6}
    fast = rec(0.0, [0.4, 0.9, 1.4])  # TTFT 0.4, TPOT 0.5: good
    slow_first = rec(0.0, [0.6, 0.7])  # TTFT 0.6: misses ttft
    slow_decode = rec(1.0, [1.1, 1.8, 2.5, 3.2])  # TPOT 0.7: misses tpot
    one_token = rec(2.0, [2.1])  # no TPOT: cannot miss it
    failed = RequestRecord(start=0.0, prompt_tokens=1, ok=False, end=0.1)
    assert [meets_slos(r, slos) for r in (fast, slow_first, slow_decode, one_token, failed)] == \
        [True, False, False, True, False]
    m = compute_metrics([fast, slow_first, slow_decode, one_token, failed], slos=slos)
    assert m["duration"] == pytest.approx(3.2)
    assert m["request_goodput"] == pytest.approx(2 / 3.2)
    assert m["slo_attainment"] == pytest.approx(2 / 5)


@pytest.mark.parametrize("bad", ["ttft", "foo:10", "ttft:abc", "tpot:-1", "tpot:0"])
def test_goodput_parsing_rejects_bad_slos(bad):
    with pytest.raises(ConfigError):
        parse_goodput([bad])


def test_max_rate_meeting_slo_interpolates_the_crossing():
    assert max_rate_meeting_slo([0.5, 1, 2], [1.0, 1.0, 0.5], 0.9) == pytest.approx(1.2)
    assert max_rate_meeting_slo([2, 1, 0.5], [0.5, 1.0, 1.0], 0.9) == pytest.approx(1.2)  # order-free
    assert max_rate_meeting_slo([1, 2], [1.0, 1.0]) == 2
    assert max_rate_meeting_slo([1, 2], [0.5, 1.0]) == 0.0  # fails at the lowest rate
    assert max_rate_meeting_slo([1, 2, 3], [1.0, 0.0, 1.0], 0.9) == pytest.approx(1.1)  # no credit past a miss
