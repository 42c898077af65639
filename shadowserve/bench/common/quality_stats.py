"""Statistics for paired accuracy comparisons: is a codec's accuracy different from recompute's?

Every codec answers the *same* questions as recompute, so the comparison is paired: what matters
is on how many questions the two disagree, in which direction. Questions that share a document
share its (de)compressed KV, so their outcomes are not independent; the interval of the paired
difference therefore resamples whole documents (a cluster bootstrap), not single questions.
scipy supplies the exact binomial pieces (Wilson interval, McNemar's exact test).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from shadowserve.errors import ConfigError


def _binomtest():
    try:
        from scipy.stats import binomtest
    except ImportError as exc:  # a bench/test extra, not a core dependency
        raise ConfigError("bench quality needs scipy (pip install shadowserve[bench])") from exc
    return binomtest


def accuracy_interval(correct: Sequence[bool], confidence: float = 0.95) -> tuple[float, float, float]:
    """(accuracy, low, high): the share correct with its Wilson score interval."""
    n, k = len(correct), int(sum(correct))
    if n == 0:
        raise ValueError("no questions")
    ci = _binomtest()(k, n).proportion_ci(confidence_level=confidence, method="wilson")
    return k / n, float(ci.low), float(ci.high)


def mcnemar_p(reference: Sequence[bool], other: Sequence[bool]) -> float:
    """Exact two-sided McNemar test: p-value of the discordant pairs splitting as they did under
    "neither is better" (a fair coin over the questions exactly one of the two got right)."""
    ref, oth = np.asarray(reference, bool), np.asarray(other, bool)
    lost = int(np.sum(ref & ~oth))
    gained = int(np.sum(~ref & oth))
    if lost + gained == 0:
        return 1.0
    return float(_binomtest()(gained, lost + gained, 0.5).pvalue)


@dataclass(frozen=True)
class PairedDifference:
    """Accuracy of ``other`` minus ``reference``, in percentage points, with its interval."""

    delta_points: float
    low: float
    high: float
    gained: int  # questions only ``other`` got right
    lost: int  # questions only ``reference`` got right


def paired_difference(reference: Sequence[bool], other: Sequence[bool], clusters: Sequence[int],
                      confidence: float = 0.95, resamples: int = 10_000, seed: int = 0) -> PairedDifference:
    """The paired accuracy difference with a percentile cluster-bootstrap interval.

    ``clusters[i]`` names the document of question ``i``; resampling draws whole documents with
    replacement, so correlated questions are not counted as independent evidence. Seeded, so the
    same answers always give the same interval.
    """
    ref, oth = np.asarray(reference, bool), np.asarray(other, bool)
    if ref.shape != oth.shape or ref.size != len(clusters) or ref.size == 0:
        raise ValueError("reference, other and clusters must be non-empty and of one length")
    diff = oth.astype(np.int64) - ref.astype(np.int64)
    _, cluster_index = np.unique(np.asarray(clusters), return_inverse=True)
    n_clusters = int(cluster_index.max()) + 1
    sums = np.bincount(cluster_index, weights=diff, minlength=n_clusters)
    sizes = np.bincount(cluster_index, minlength=n_clusters).astype(np.float64)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n_clusters, size=(resamples, n_clusters))
    boot = sums[draws].sum(1) / sizes[draws].sum(1) * 100.0
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(boot, [alpha, 1.0 - alpha])
    return PairedDifference(
        delta_points=float(diff.mean() * 100.0),
        low=float(low),
        high=float(high),
        gained=int(np.sum(~ref & oth)),
        lost=int(np.sum(ref & ~oth)),
    )


def paired_summary(reference: Sequence[bool], other: Sequence[bool], clusters: Sequence) -> dict:
    """The paired comparison as bench quality reports it: the change in points with its interval, the
    discordant counts and McNemar's p (``clusters``: each question's document, any hashable)."""
    ids = {c: n for n, c in enumerate(dict.fromkeys(clusters))}
    diff = paired_difference(reference, other, [ids[c] for c in clusters])
    return {"delta_points": diff.delta_points, "delta_ci": [diff.low, diff.high], "lost": diff.lost,
            "gained": diff.gained, "mcnemar_p": mcnemar_p(reference, other)}


def per_task_summaries(tasks: Sequence[str], reference: Sequence[bool], other: Sequence[bool],
                       clusters: Sequence) -> dict[str, dict]:
    """``paired_summary`` for each task's questions alone (where a codec loses: copying or reasoning)."""
    out = {}
    for task in dict.fromkeys(tasks):
        pick = [i for i, t in enumerate(tasks) if t == task]
        out[task] = paired_summary([reference[i] for i in pick], [other[i] for i in pick], [clusters[i] for i in pick])
    return out
