"""Pooling several ``bench quality`` runs question by question (scripts/pool_quality.py).

Runs on different seeds ask different questions, so together they measure a codec with more power
than any one of them. Each run's JSON keeps, per question, its document and whether recompute and
each level/codec got it right (``per_question``; since session 15 also its task). Pooling joins them,
keeps documents of different runs apart (the interval resamples whole documents) and compares as
``bench quality`` does one run, per task too when every run names its questions' tasks (or its spec
tells them apart).
"""

from __future__ import annotations

from collections import Counter

from shadowserve.bench.common.quality_stats import accuracy_interval, paired_summary, per_task_summaries
from shadowserve.bench.common.quality_tasks import TASKS
from shadowserve.errors import ConfigError

_TASK_OF_INITIAL = {t[0]: t for t in TASKS}


# KV format 4 stages format 3's symbols in another order (token pairs, kvcache/packing.py): the same
# quantizer, so the same decoded KV, and runs of either pool together.
_SAME_KV = {"sskv4/": "sskv3/"}


def _kv_format(row: dict) -> str:
    """The codec id less its lossless stage, with staging-only format versions folded together."""
    fmt = row["codec"].rsplit("/", 1)[0]
    for newer, older in _SAME_KV.items():
        if fmt.startswith(newer):
            return older + fmt[len(newer):]
    return fmt


def _entry(report: dict, name: str, kv_format: str | None) -> tuple[str, str] | None:
    """(name, KV format) under which ``report`` measured ``name``: itself, or (once the KV format is known
    from an earlier run) any level or codec that decodes to the same KV, e.g. a level and the preset it
    became."""
    formats = {n: _kv_format(row) for n, row in {**report["codecs"], **report["levels"]}.items()}
    if name in formats and kv_format in (None, formats[name]):
        return name, formats[name]
    return next(((n, f) for n, f in formats.items() if f == kv_format), None)


def _tasks(report: dict) -> list[str]:
    """Each question's task: from ``per_question`` (runs since session 15) or, for earlier runs, from the
    run's spec, whose needle and chain documents ask different numbers of questions ([] if they ask the same)."""
    per = report["per_question"]
    if "task" in per:
        return [_TASK_OF_INITIAL[t] for t in per["task"]]
    spec = report.get("spec", {})
    by_count = {spec.get("needles"): "needle", spec.get("chains"): "chain"}
    if len(by_count) < 2 or None in by_count:
        return []
    counts = Counter(per["document"])
    return [by_count.get(counts[d], "?") for d in per["document"]]


def pool_runs(reports: list[dict], name: str) -> dict:
    """The pooled comparison of ``name`` (or the same KV under another name) with recompute over the runs."""
    ref, other, clusters, tasks, kv_format = [], [], [], [], None
    for i, report in enumerate(reports):
        per = report.get("per_question")
        if per is None:
            raise ConfigError(f"run {i + 1} has no per-question outcomes (rerun it with this version of bench quality)")
        entry = _entry(report, name, kv_format)
        if entry is None:
            measured = ", ".join(k for k in per if k not in ("document", "task", "recompute"))
            raise ConfigError(f"run {i + 1} did not measure {name!r} or the KV it decodes to (it has {measured})")
        found, kv_format = entry
        ref += [c == "1" for c in per["recompute"]]
        other += [c == "1" for c in per[found]]
        clusters += [(i, d) for d in per["document"]]
        tasks += _tasks(report)
    acc, low, high = accuracy_interval(other)
    ref_acc, ref_low, ref_high = accuracy_interval(ref)
    row = {"name": name, "kv_format": kv_format, "runs": len(reports), "questions": len(ref),
           "documents": len(set(clusters)), "recompute_accuracy": ref_acc, "recompute_ci": [ref_low, ref_high],
           "accuracy": acc, "accuracy_ci": [low, high], **paired_summary(ref, other, clusters)}
    if len(tasks) == len(ref) and "?" not in tasks:  # every run says, or its spec tells, each question's task
        row["per_task_delta"] = per_task_summaries(tasks, ref, other, clusters)
    return row
