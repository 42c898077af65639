"""Quality levels: four named codecs a user picks from instead of raw quantizer knobs.

``lossless`` reproduces recompute token for token; ``high``, ``balanced`` (the default) and
``compact`` trade answer quality for smaller chunks. Each level's measured ratio and task-accuracy
change are in docs/results.md ("Answer quality") and docs/codec.md; ``shadowserve bench quality``
re-measures them. Raw codec settings still work and override the level's values field by field.
"""

from __future__ import annotations

from dataclasses import asdict, replace
from typing import Any

from shadowserve.config import CodecConfig
from shadowserve.errors import ConfigError

DEFAULT_QUALITY = "balanced"

# Ordered from most to least faithful. CodecConfig()'s own defaults are the session-9 default codec
# (``bench codec``'s "default" preset, kept for comparisons); what serves by default is ``balanced``.
QUALITY_LEVELS: dict[str, CodecConfig] = {
    "lossless": CodecConfig(quant="none"),
    # Session 17: balanced's plane, channel and head steps with every value step halved and keys at 0.25
    # (bench codec name balanced+v0.5+k0.25): 4.25x, and no loss on 6,144 fresh questions (seeds 8 and 12:
    # +0.4 points [-0.05, +0.86]). It replaced session 15's "high" (3.79x; preset planes-high-heads-smollm2)
    # by a rule fixed before the seed-12 run: docs/results.md, "Session 17". Session 19: 4.50x; pooled over
    # seeds 8, 12, 13 and 15 (12,288 questions) -0.02 points [-0.35, +0.32].
    "high": CodecConfig(key_offsets=True, layer_steps="smollm2-135m-qa-5x-heads", key_step=0.25, value_step=0.5,
                        key_channel_steps="smollm2-135m", head_steps="smollm2-135m-retrieval"),
    # Session 13: the schedule fitted to answers as well as text, retrieval planes finer (session 12),
    # which halves the accuracy loss of session 10's "smollm2-135m-balanced" (bench preset
    # planes-balanced-smollm2); byte-wide planes (kvcache/packing.py) made its fine planes cheap.
    # Session 14: plus per-channel key steps from the queries' energy (kvcache/channel_steps.py), keys
    # finer overall: a third less KL at the same ratio (session 13's codec: preset planes-qa-5x-smollm2).
    # Session 15: single retrieval heads pinned instead of whole planes (head_steps), nine of them: 0.4
    # points less loss on fresh questions at the same ratio (session 14's: planes-qa-5x-channels-smollm2).
    # Session 18: token pairs and a zstd block per plane made chunks 8% smaller (5.52x), spent on value
    # steps x0.7 (5.06x; bench codec name balanced+v0.7), adopted by a rule fixed before the seed-13 run:
    # -0.47 points pooled over seeds 8, 13 and 14 against session 15's -0.98 over seeds 4, 8, 12 and 13
    # (preset planes-qa-5x-heads-smollm2): docs/results.md, "Session 18". Session 19: 5.03x (a zstd block
    # only where its table pays); on seed 15 -0.2 points, pooled over seeds 8, 13, 14 and 15 -0.39.
    "balanced": CodecConfig(key_offsets=True, layer_steps="smollm2-135m-qa-5x-heads", key_step=0.3, value_step=0.7,
                            key_channel_steps="smollm2-135m", head_steps="smollm2-135m-retrieval"),
    "compact": CodecConfig(key_offsets=True, layer_steps="smollm2-135m-compact"),
}


def codec_for_quality(quality: str = DEFAULT_QUALITY, /, **overrides: Any) -> CodecConfig:
    """The level's codec, with any raw codec settings in ``overrides`` applied on top.

    Positional-only: ``level`` is a codec setting (the lossless stage's level) and may be overridden.
    """
    if quality not in QUALITY_LEVELS:
        raise ConfigError(f"unknown kv_quality {quality!r}: choose one of {', '.join(QUALITY_LEVELS)}")
    try:
        return replace(QUALITY_LEVELS[quality], **overrides)
    except TypeError as exc:  # a setting CodecConfig does not have
        raise ConfigError(f"invalid codec setting: {exc}") from None


def quality_of(codec: CodecConfig) -> str | None:
    """The level whose codec ``codec`` is (ignoring transport-only choices), or None for a custom one."""
    transport = ("lossless", "level", "min_saving", "pack_nibbles", "key_offsets", "lossless_block")  # none changes decoded KV
    mine = {k: v for k, v in asdict(codec).items() if k not in transport}
    for name, config in QUALITY_LEVELS.items():
        if mine == {k: v for k, v in asdict(config).items() if k not in transport}:
            return name
    return None
