"""The soak benchmark's verdicts and tables: every request judged against its reference answer.

A request is ``correct`` (the text equals what recompute produced), ``wrong`` (an answer that
differs), ``failed`` (an HTTP error or a dropped connection) or ``hung`` (no answer within the
timeout). Latencies are grouped by the phase the request started in.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from shadowserve.bench.common.answer_client import Answer

VERDICTS = ("correct", "wrong", "failed", "hung")


@dataclass
class Record:
    phase: str
    prompt: int  # index into the workload's prompts
    start_s: float  # since the run began
    seconds: float
    verdict: str
    fetched_tokens: int = 0
    error: str | None = None


def judge(answer: Answer, reference: str) -> str:
    if answer.hung:
        return "hung"
    if answer.text is None:
        return "failed"
    return "correct" if answer.text == reference else "wrong"


def summarize(records: list[Record], phases: list[str]) -> dict:
    """Counts per verdict and p50/p99 latency per phase (phases in the order given), plus totals."""
    def one(rs: list[Record]) -> dict:
        out = {v: sum(r.verdict == v for r in rs) for v in VERDICTS}
        out["sent"] = len(rs)
        out["fetched"] = sum(r.fetched_tokens > 0 for r in rs if r.verdict == "correct")
        lat = [r.seconds for r in rs if r.verdict in ("correct", "wrong")]
        out["p50_s"] = float(np.percentile(lat, 50)) if lat else None
        out["p99_s"] = float(np.percentile(lat, 99)) if lat else None
        return out

    per_phase = {p: one([r for r in records if r.phase == p]) for p in phases}
    return {"total": one(records), "phases": per_phase,
            "errors": sorted({r.error for r in records if r.error})[:10]}


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1e3:.0f}"


def format_report(summary: dict, resources: dict[str, dict[str, int]], fired: dict[str, int]) -> str:
    """The table a soak run prints: per phase, totals, faults fired, and resources start -> end."""
    head = f"{'phase':<19} {'sent':>6} {'correct':>8} {'wrong':>6} {'failed':>7} {'hung':>5} {'fetched':>8} " \
           f"{'p50 ms':>8} {'p99 ms':>8}"
    lines = [head]
    rows = list(summary["phases"].items()) + [("all", summary["total"])]
    for name, s in rows:
        if not s["sent"]:
            continue
        lines.append(f"{name:<19} {s['sent']:>6} {s['correct']:>8} {s['wrong']:>6} {s['failed']:>7} {s['hung']:>5} "
                     f"{s['fetched']:>8} {_ms(s['p50_s']):>8} {_ms(s['p99_s']):>8}")
    lines.append("faults fired: " + ", ".join(f"{k} x{v}" for k, v in fired.items()))
    lines.append(f"{'resource':<19} {'start':>8} {'end':>8}")
    for name, r in resources.items():
        lines.append(f"{name:<19} {r.get('start', '-'):>8} {r.get('end', '-'):>8}")
    for err in summary["errors"]:
        lines.append(f"error seen: {err}")
    return "\n".join(lines)


def records_json(records: list[Record]) -> list[dict]:
    return [asdict(r) for r in records]
