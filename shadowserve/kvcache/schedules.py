"""Fitted step schedules: per-(layer, K/V) step multipliers measured for one model, by name.

``CodecConfig(layer_steps=NAME)`` takes one of these instead of a list. A schedule is fitted to one
model's layer count; on a model with another count, a list is refused, but a named schedule applies
its mean multiplier (geometric, keys and values apart) in every layer instead, so a quality level
built on it keeps about its bits on any model. How they were fitted: docs/codec.md, "Steps per plane".

Each value lists ``k0,v0,k1,v1,...`` for SmolLM2-135M's 30 layers: the step of every (layer, K/V)
plane that minimizes KL + lambda x bits, given each plane's measured KL at the default step (alone,
the rest exact; KL ~ step^2) and its measured symbol entropy at each step, on two stretches of text
other than the one ``bench codec`` scores.
"""

from __future__ import annotations

import math

from shadowserve.config import CodecConfig
from shadowserve.errors import ConfigError

SCHEDULES: dict[str, str] = {
    # lambda 3e-5, with each plane's whole-symbol entropy (chunks keep one byte per symbol).
    "smollm2-135m-high": (
        "1,0.5,0.45,0.45,0.4,0.4,0.45,0.56,0.56,0.63,0.4,0.5,0.56,0.5,0.32,0.36,0.28,0.28,0.5,0.45,"
        "0.225,0.56,0.5,1,0.28,0.25,0.25,0.28,0.18,0.18,0.18,0.16,0.25,0.32,0.16,0.18,0.16,0.125,0.25,0.2,"
        "0.125,0.14,0.18,0.25,0.18,0.36,0.06,0.18,0.06,0.18,0.5,0.4,0.2,0.4,0.28,0.45,0.4,0.36,0.36,0.5"),
    # Session 12: "high" with the retrieval planes pinned finer (docs/codec-task-fit.json, "derived"). Scored
    # worse than "high" on bench quality (docs/results.md, session 12); kept so that result can be rerun.
    "smollm2-135m-high-pinned": (
        "1,0.5,0.45,0.45,0.4,0.4,0.45,0.56,0.56,0.63,0.4,0.5,0.56,0.5,0.1,0.36,0.1,0.28,0.5,0.45,"
        "0.225,0.56,0.5,1,0.28,0.25,0.25,0.28,0.18,0.18,0.18,0.16,0.25,0.32,0.06,0.08,0.05,0.06,0.25,0.2,"
        "0.05,0.14,0.18,0.25,0.18,0.36,0.05,0.08,0.06,0.18,0.5,0.4,0.2,0.4,0.28,0.45,0.4,0.36,0.36,0.5"),
    # lambda 4e-5 (nibble entropy with key offsets): tried in session 10 for a balanced level that keeps
    # task accuracy (docs/results.md, "Answer quality").
    "smollm2-135m-4x": (
        "1.12,0.71,0.56,0.63,0.56,0.56,0.63,0.63,0.63,0.71,0.56,0.56,0.63,0.63,0.5,0.45,0.5,0.4,0.63,0.63,"
        "0.4,0.71,0.56,1.4,0.45,0.35,0.45,0.4,0.4,0.35,0.35,0.3,0.45,0.45,0.35,0.35,0.35,0.25,0.45,0.35,"
        "0.3,0.3,0.35,0.4,0.35,0.45,0.25,0.35,0.25,0.35,0.56,0.5,0.4,0.5,0.45,0.56,0.5,0.45,0.5,0.56"),
    # lambda 1.9e-4 (nibble entropy with key offsets).
    "smollm2-135m-balanced": (
        "2.25,1.25,1,1.12,1,1,1.12,1.25,1.25,1.4,0.9,1.25,1.4,1.25,0.9,0.8,0.8,0.71,1.12,1.12,"
        "0.56,1.4,1.12,3.2,0.71,0.63,0.71,0.71,0.56,0.5,0.5,0.45,0.63,0.8,0.56,0.5,0.56,0.4,0.63,0.56,"
        "0.45,0.45,0.5,0.63,0.56,0.9,0.4,0.45,0.35,0.5,1.12,1,0.56,1,0.71,1.12,1,0.9,0.8,1.12"),
    # Session 12, fitted to the answers of bench quality's tasks as well as to long text (docs/codec.md,
    # "Steps fitted to answers"): each plane's cost is 0.7 x its share of the answer-position KL plus
    # 0.3 x its share of the long-text KL, at lambda 5e-3 ("qa-balanced") and 3e-3 ("qa-5x"), then the
    # keys of layers 17, 18, 20, 23 and the values of 17 and 18 (where retrieval happens) pinned finer.
    "smollm2-135m-qa-balanced": (
        "2.8,1.8,1.12,1.4,1.12,1.25,1.25,1.6,1.6,1.8,1,1.4,1.12,1.25,0.63,0.71,0.63,0.71,1.25,1.4,"
        "0.71,1.6,1,1.8,0.8,0.71,0.8,0.9,0.63,0.56,0.5,0.5,0.8,1,0.125,0.3,0.08,0.25,0.63,0.56,"
        "0.125,0.45,0.56,0.71,0.63,1.12,0.08,0.45,0.4,0.56,1.6,1.25,0.71,1.25,0.9,1.4,1,1.12,1,1.4"),
    "smollm2-135m-qa-5x": (
        "2.25,1.4,0.9,1.12,0.9,1,1,1.25,1.25,1.4,0.8,1.12,0.9,1,0.56,0.56,0.56,0.56,1,1.12,"
        "0.63,1.25,0.8,1.4,0.63,0.63,0.63,0.71,0.56,0.45,0.45,0.45,0.63,0.8,0.125,0.3,0.08,0.25,0.5,0.5,"
        "0.125,0.4,0.5,0.56,0.56,0.8,0.08,0.4,0.35,0.45,1.25,1,0.56,1,0.71,1.12,0.8,0.9,0.8,1.12"),
    # Session 15: "qa-5x" before its pins (schedules.fit of the blend at lambda 3e-3), for levels that pin
    # single heads instead of whole planes (HEAD_STEPS).
    "smollm2-135m-qa-5x-heads": (
        "2.25,1.4,0.9,1.12,0.9,1,1,1.25,1.25,1.4,0.8,1.12,0.9,1,0.56,0.56,0.56,0.56,1,1.12,"
        "0.63,1.25,0.8,1.4,0.63,0.63,0.63,0.71,0.56,0.45,0.45,0.45,0.63,0.8,0.4,0.4,0.25,0.35,0.5,0.5,"
        "0.35,0.4,0.5,0.56,0.56,0.8,0.25,0.4,0.35,0.45,1.25,1,0.56,1,0.71,1.12,0.8,0.9,0.8,1.12"),
    # lambda 5e-4.
    "smollm2-135m-7x": (
        "3.6,2,1.6,1.8,1.6,1.6,1.8,2,2,2.5,1.4,2,2,2,1.25,1.4,1.12,1.12,1.8,1.8,"
        "0.8,2.25,1.8,4,1,0.9,1,1.12,0.8,0.71,0.71,0.71,1,1.25,0.8,0.71,0.8,0.56,0.9,0.8,"
        "0.63,0.63,0.71,0.9,0.71,1.4,0.5,0.71,0.45,0.71,1.8,1.4,0.8,1.4,1.12,1.8,1.4,1.4,1.25,1.8"),
    # lambda 8.5e-4.
    "smollm2-135m-compact": (
        "4,2.5,2,2.25,1.8,2.25,2.25,2.8,2.5,3.2,1.8,2.5,2.5,2.5,1.6,1.8,1.4,1.4,2.25,2.5,"
        "1.12,2.8,2,4,1.4,1.25,1.25,1.4,1,0.9,0.9,0.8,1.25,1.6,0.9,0.9,0.9,0.71,1.12,1,"
        "0.71,0.8,0.9,1.25,1,1.8,0.56,0.9,0.56,0.9,2.25,2,1,2,1.4,2.25,2,1.8,1.6,2.5"),
}


# Per-head steps (``CodecConfig.head_steps``): (layers, kv_heads) of the model they were measured on, and
# the list. Session 15: the heads that hold most of bench quality's answer KL (docs/codec-task-heads.json):
# the six whose planes "qa-5x" pins, at the pinned planes' steps relative to "qa-5x-heads" (0.08 / 0.25 =
# 0.32, ...), and the next three (1-1.5% of the answer KL each) at half their plane's step, chosen on an
# answer screen (docs/codec.md, "Steps per head").
HEAD_STEPS: dict[str, tuple[tuple[int, int], str]] = {
    "smollm2-135m-retrieval": ((30, 3), "17k1:0.31,18k2:0.32,20k2:0.36,23k0:0.32,17v1:0.75,18v2:0.71,"
                                        "20k1:0.5,7k2:0.5,8k0:0.5"),
}


def step_multipliers(config: CodecConfig) -> tuple[float, ...]:
    """``config.layer_steps`` resolved: a named schedule's multipliers, the listed ones, or ()."""
    steps = config.layer_steps.strip()
    if not steps:
        return ()
    if steps in SCHEDULES:
        return multipliers(steps)
    try:
        return tuple(float(x) for x in steps.split(","))
    except ValueError:
        raise ConfigError(f"layer_steps {steps!r} is neither a list of numbers nor a fitted schedule "
                          f"({', '.join(SCHEDULES)})") from None


def is_named(config: CodecConfig) -> bool:
    """Whether ``layer_steps`` names a fitted schedule (which adapts to other layer counts)."""
    return config.layer_steps.strip() in SCHEDULES


def multipliers(name: str) -> tuple[float, ...]:
    """A named schedule's multipliers (``k0, v0, k1, v1, ...``)."""
    return tuple(float(x) for x in SCHEDULES[name].split(","))


def mean_pair(mults: tuple[float, ...]) -> tuple[float, float]:
    """The geometric means of a per-plane schedule's key and value multipliers."""
    keys, values = mults[0::2], mults[1::2]
    return (math.exp(sum(map(math.log, keys)) / len(keys)), math.exp(sum(map(math.log, values)) / len(values)))


def fit(kl: list, bits: list, grid: list[float], lam: float) -> tuple[float, ...]:
    """The schedule minimizing sum(KL) + ``lam`` x bits per symbol, plane by plane.

    ``kl[layer][kv]``: the plane's KL at multiplier 1 (alone), modelled as growing with the step
    squared; ``bits[layer][kv][i]``: its entropy per symbol at multiplier ``grid[i]``. Averaged over
    several texts by the caller. docs/codec-plane-fit.json holds the measurements the schedules above
    came from (``fit`` of the two texts' mean, at the lambda it lists, gives each of them).
    """
    out = []
    for layer_kl, layer_bits in zip(kl, bits):
        for plane_kl, plane_bits in zip(layer_kl, layer_bits):
            costs = [plane_kl * m * m + lam * b for m, b in zip(grid, plane_bits)]
            out.append(grid[costs.index(min(costs))])
    return tuple(out)


def blend(answer_kl: list, text_kl: list, answer_weight: float) -> list:
    """Per-plane costs mixing two sensitivities, each as its share of its own total.

    ``answer_kl[layer][kv]``: KL at the answer tokens of gold-answer questions with only that plane
    quantized; ``text_kl``: the same on long text. Answers weigh retrieval (a few key planes carry
    most of it); text keeps perplexity in check everywhere else.
    """
    total_a = sum(map(sum, answer_kl))
    total_t = sum(map(sum, text_kl))
    return [[answer_weight * a / total_a + (1 - answer_weight) * t / total_t for a, t in zip(la, lt)]
            for la, lt in zip(answer_kl, text_kl)]


def pin(mults: tuple[float, ...], pins: dict[tuple[int, int], float]) -> tuple[float, ...]:
    """``mults`` with the planes in ``pins`` ((layer, kv) -> multiplier) made at least that fine.

    For planes whose fine steps the nibble-entropy grid cannot price (their symbols escape the nibble
    range), chosen by measuring whole chunks instead (docs/codec.md, "Steps fitted to answers").
    """
    out = list(mults)
    for (layer, kv), m in pins.items():
        out[2 * layer + kv] = min(out[2 * layer + kv], m)
    return tuple(out)
