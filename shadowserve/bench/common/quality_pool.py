"""Pooling several ``bench quality`` runs question by question (scripts/pool_quality.py).

Runs on different seeds ask different questions, so together they measure a codec with more power
than any one of them. Each run's JSON keeps, per question, its document and whether recompute and
each level/codec got it right (``per_question``). Pooling joins them, keeps documents of different
runs apart (the interval resamples whole documents) and compares as ``bench quality`` does one run.
"""

from __future__ import annotations

from shadowserve.bench.common.quality_stats import accuracy_interval, mcnemar_p, paired_difference
from shadowserve.errors import ConfigError


def _row(report: dict, name: str) -> dict | None:
    return report["levels"].get(name) or report["codecs"].get(name)


def pool_runs(reports: list[dict], name: str) -> dict:
    """The pooled comparison of ``name`` with recompute over every run that measured it."""
    ref, other, clusters, formats = [], [], [], set()
    for i, report in enumerate(reports):
        per = report.get("per_question")
        if per is None:
            raise ConfigError(f"run {i + 1} has no per-question outcomes (rerun it with this version of bench quality)")
        if name not in per:
            raise ConfigError(f"run {i + 1} did not measure {name!r} (it has {', '.join(k for k in per if k != 'document')})")
        formats.add(_row(report, name)["codec"].rsplit("/", 1)[0])
        ref += [c == "1" for c in per["recompute"]]
        other += [c == "1" for c in per[name]]
        clusters += [(i, d) for d in per["document"]]
    if len(formats) > 1:
        raise ConfigError(f"{name!r} decodes differently across the runs ({', '.join(sorted(formats))})")
    ids = {c: n for n, c in enumerate(dict.fromkeys(clusters))}
    diff = paired_difference(ref, other, [ids[c] for c in clusters])
    acc, low, high = accuracy_interval(other)
    ref_acc, ref_low, ref_high = accuracy_interval(ref)
    return {"name": name, "kv_format": formats.pop(), "runs": len(reports), "questions": len(ref),
            "documents": len(ids), "recompute_accuracy": ref_acc, "recompute_ci": [ref_low, ref_high],
            "accuracy": acc, "accuracy_ci": [low, high], "delta_points": diff.delta_points,
            "delta_ci": [diff.low, diff.high], "lost": diff.lost, "gained": diff.gained,
            "mcnemar_p": mcnemar_p(ref, other)}
