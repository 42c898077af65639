"""Load-test metrics computed from request records alone, named as ``vllm bench serve`` names them.

TTFT = first token - start; TPOT = (end - first token) / (output tokens - 1) per request with more
than one output token; ITL = every gap between consecutive output tokens; E2EL = end - start.
Latencies are reported in ms as mean/median/std and the requested percentiles (linear interpolation
between closest ranks); throughputs divide by the run's duration, from the first start to the last end.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from shadowserve.bench.common.drivers import RequestRecord
from shadowserve.errors import ConfigError

SLO_METRICS = ("ttft", "tpot", "e2el")


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) with linear interpolation between closest ranks; NaN if empty."""
    if not values:
        return math.nan
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {q}")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _summary(name: str, values_s: Sequence[float], percentiles: Sequence[float]) -> dict[str, float]:
    ms = [v * 1e3 for v in values_s]
    n = len(ms)
    mean = sum(ms) / n if n else math.nan
    std = math.sqrt(sum((v - mean) ** 2 for v in ms) / n) if n else math.nan
    out = {f"mean_{name}_ms": mean, f"median_{name}_ms": percentile(ms, 50), f"std_{name}_ms": std}
    for q in percentiles:
        out[f"p{q:g}_{name}_ms"] = percentile(ms, q)
    return out


def request_latencies(r: RequestRecord) -> dict[str, float | None]:
    """TTFT, TPOT and E2EL of one successful request in seconds (None where undefined)."""
    ttft = None if r.first_token is None else r.first_token - r.start
    e2el = None if r.end is None else r.end - r.start
    tpot = None
    if r.output_tokens > 1 and r.end is not None and r.first_token is not None:
        tpot = (r.end - r.first_token) / (r.output_tokens - 1)
    return {"ttft": ttft, "tpot": tpot, "e2el": e2el}


def parse_goodput(items: Sequence[str] | None) -> dict[str, float]:
    """``["ttft:2000", "tpot:300"]`` -> {"ttft": 2.0, "tpot": 0.3} (SLOs given in ms, kept in seconds)."""
    slos: dict[str, float] = {}
    for item in items or []:
        name, _, value = item.partition(":")
        if name not in SLO_METRICS:
            raise ConfigError(f"unknown goodput metric {name!r}: use one of {', '.join(SLO_METRICS)}")
        try:
            ms = float(value)
        except ValueError:
            raise ConfigError(f"goodput SLO {item!r} needs a number of ms, like ttft:2000") from None
        if ms <= 0:
            raise ConfigError(f"goodput SLO {item!r} must be > 0 ms")
        slos[name] = ms / 1e3
    return slos


def meets_slos(r: RequestRecord, slos: dict[str, float]) -> bool:
    """A successful request whose every SLO'd latency is defined and within its limit.

    An undefined TPOT (one output token) cannot violate a TPOT SLO.
    """
    if not r.ok:
        return False
    lat = request_latencies(r)
    for name, limit in slos.items():
        value = lat[name]
        if value is None:
            if name == "tpot":
                continue
            return False
        if value > limit:
            return False
    return True


def compute_metrics(records: Sequence[RequestRecord], percentiles: Sequence[float] = (99,),
                    slos: dict[str, float] | None = None) -> dict[str, float | int]:
    """Every metric of a load run, from its records only."""
    done = [r for r in records if r.ok and r.end is not None]
    starts = [r.start for r in records]
    ends = [r.end for r in records if r.end is not None]
    duration = (max(ends) - min(starts)) if starts and ends else 0.0
    per_s = (lambda x: x / duration) if duration > 0 else (lambda x: math.nan)
    in_tok = sum(r.prompt_tokens for r in done)
    out_tok = sum(r.output_tokens for r in done)
    lats = [request_latencies(r) for r in done]
    itls = [b - a for r in done for a, b in zip(r.token_times, r.token_times[1:])]
    m: dict[str, float | int] = {
        "completed": len(done),
        "failed": len(records) - len(done),
        "duration": duration,
        "total_input_tokens": in_tok,
        "total_output_tokens": out_tok,
        "total_fetched_tokens": sum(r.fetched_tokens for r in done),
        "request_throughput": per_s(len(done)),
        "output_throughput": per_s(out_tok),
        "total_token_throughput": per_s(in_tok + out_tok),
    }
    for name in ("ttft", "tpot", "e2el"):
        m.update(_summary(name, [x[name] for x in lats if x[name] is not None], percentiles))
    m.update(_summary("itl", itls, percentiles))
    if slos:
        good = sum(1 for r in done if meets_slos(r, slos))
        m["request_goodput"] = per_s(good)
        m["slo_attainment"] = good / len(records) if records else math.nan
    return m


def format_table(m: dict, title: str = "Serving Benchmark Result") -> str:
    """The metrics as the text block a user reads after a run."""
    lines = [f"{'=' * 18} {title} {'=' * 18}"]

    def row(label: str, key: str, fmt: str = "{:.2f}") -> None:
        if key in m:
            lines.append(f"{label:<40}{fmt.format(m[key]):>12}")

    row("Successful requests:", "completed", "{}")
    row("Failed requests:", "failed", "{}")
    row("Benchmark duration (s):", "duration")
    row("Total input tokens:", "total_input_tokens", "{}")
    row("Total generated tokens:", "total_output_tokens", "{}")
    row("Prompt tokens fetched from the store:", "total_fetched_tokens", "{}")
    row("Request throughput (req/s):", "request_throughput")
    row("Request goodput (req/s):", "request_goodput")
    row("SLO attainment:", "slo_attainment")
    row("Output token throughput (tok/s):", "output_throughput")
    row("Total token throughput (tok/s):", "total_token_throughput")
    for name, label in (("ttft", "Time to First Token"), ("tpot", "Time per Output Token (excl. 1st token)"),
                        ("itl", "Inter-token Latency"), ("e2el", "End-to-end Latency")):
        lines.append(f"{'-' * 15}{label}{'-' * 15}")
        for key in sorted(k for k in m if k.endswith(f"_{name}_ms") and not k.startswith("std_")):
            stat = key.split("_")[0]
            lines.append(f"{(stat.capitalize() if stat in ('mean', 'median') else stat.upper()) + ' ' + name.upper() + ' (ms):':<40}"
                         f"{m[key]:>12.2f}")
    lines.append("=" * (38 + len(title)))
    return "\n".join(lines)


def max_rate_meeting_slo(rates: Sequence[float], attainment: Sequence[float], target: float = 0.9) -> float:
    """The highest request rate whose SLO attainment is still >= ``target``, interpolating linearly
    between the measured rates where attainment crosses the target (0 if even the lowest misses).

    Attainment normally falls as the rate rises; past the first crossing nothing counts, so one lucky
    point at a high rate cannot raise the answer.
    """
    pts = sorted(zip(rates, attainment))
    if not pts or pts[0][1] < target:
        return 0.0
    best = pts[0][0]
    for (r0, a0), (r1, a1) in zip(pts, pts[1:]):
        if a1 >= target:
            best = r1
            continue
        best = r0 + (r1 - r0) * (a0 - target) / (a0 - a1)
        break
    return best
