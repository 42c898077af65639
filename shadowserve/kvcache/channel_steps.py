"""Per-channel key steps: finer steps in the key channels that queries weigh most.

An error ``e`` in key channel ``c`` moves an attention logit by ``q_c * e``, and queries put most of
their weight on a few channels. So instead of one step for every channel of a key row, channel ``c``
of layer ``l`` gets ``step x m[l, c]`` with ``m = energy ** (-power / 2)``, where ``energy`` is the
mean squared query of that channel measured on calibration text (``scripts/fit_channel_steps.py``,
tables in ``channel_steps/``; ``power=1`` minimizes the logit error for the bits, smaller powers go
part way). The multipliers have a geometric mean of 1 per layer, so the bits stay about the same
while the error moves out of the channels queries look at.

**Per-head steps** (``CodecConfig.head_steps``) go further for the few KV heads where a model retrieves:
one head of one plane gets a finer step while the rest of its row keeps its own. The row's RMS is
measured without them (a head pinned 3x finer would otherwise raise the RMS and cancel its own pin);
only the no-clipping bound sees them.

Both sides need the multipliers: the encoder divides by them before quantizing, the decoder multiplies
them back (quant.py). They are fixed by the codec config (a named table and a power, a named or listed
set of head steps), which the chunk keys and the container's format id carry, so a chunk is only ever
decoded with its own.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from shadowserve.config import CodecConfig
from shadowserve.errors import ConfigError
from shadowserve.kvcache.schedules import HEAD_STEPS

TABLE_DIR = Path(__file__).with_name("channel_steps")


def table_names() -> list[str]:
    """The measured tables shipped with the package (``key_channel_steps`` names one)."""
    return sorted(p.stem for p in TABLE_DIR.glob("*.json"))


def _read(name: str) -> bytes:
    path = TABLE_DIR / f"{name}.json"
    if not path.is_file():
        raise ConfigError(f"key_channel_steps {name!r} is not a measured table ({', '.join(table_names())})")
    return path.read_bytes()


def format_tag(config: CodecConfig) -> str:
    """What the KV format id says about channel and head steps: '' when off, else digests of what decides
    them (the table and power; the head steps' list)."""
    tag = ""
    if config.key_channel_steps:
        digest = hashlib.sha256(_read(config.key_channel_steps) + f"|{config.key_channel_power:g}".encode())
        tag += f":C{digest.hexdigest()[:12]}"
    if config.head_steps.strip():
        listed = head_steps_text(dict(sorted(_head_steps(config)[1].items())))
        tag += f":H{hashlib.sha256(listed.encode()).hexdigest()[:12]}"
    return tag


def _head_steps(config: CodecConfig) -> tuple[tuple[int, int] | None, dict[tuple[int, int, int], float]]:
    """``config.head_steps`` resolved: the (layers, kv_heads) a named set is for (None for a list) and the
    multipliers by (layer, kv, head)."""
    spec = config.head_steps.strip()
    shape = None
    if spec in HEAD_STEPS:
        shape, spec = HEAD_STEPS[spec]
    elif spec and ":" not in spec:
        raise ConfigError(f"head_steps {spec!r} is neither a list nor a fitted set ({', '.join(HEAD_STEPS)})")
    pins: dict[tuple[int, int, int], float] = {}
    for item in filter(None, (x.strip() for x in spec.split(","))):
        where, m = item.split(":")
        kv = 0 if "k" in where else 1
        layer, head = (int(x) for x in where.split("kv"[kv]))
        if (layer, kv, head) in pins:
            raise ConfigError(f"head_steps names {layer}{'kv'[kv]}{head} twice")
        pins[(layer, kv, head)] = float(m)
    return shape, pins


def head_steps_text(pins: dict[tuple[int, int, int], float]) -> str:
    """Multipliers by (layer, kv, head) written as a ``head_steps`` list (``18k2:0.32,...``)."""
    return ",".join(f"{layer}{'kv'[kv]}{head}:{m:g}" for (layer, kv, head), m in pins.items())


def listed_head_steps(config: CodecConfig) -> dict[tuple[int, int, int], float]:
    """``config.head_steps`` as multipliers by (layer, kv, head), a named set expanded to its list."""
    return _head_steps(config)[1]


def head_multipliers(config: CodecConfig, layers: int, kv_heads: int, head_dim: int) -> torch.Tensor | None:
    """Per-head step multipliers [layers, 2, kv_heads * head_dim] (fp32), or None without head steps.

    A named set measured on a model of another shape is left unused (like a channel table); a listed head
    that the model does not have is refused.
    """
    if config.quant != "rms" or not config.head_steps.strip():
        return None
    shape, pins = _head_steps(config)
    if shape is not None and shape != (layers, kv_heads):
        return None
    m = torch.ones(layers, 2, kv_heads, head_dim)
    for (layer, kv, head), factor in pins.items():
        if layer >= layers or head >= kv_heads:
            raise ConfigError(f"head_steps names layer {layer} head {head}, but the model has {layers} layers "
                              f"of {kv_heads} KV heads")
        m[layer, kv, head] = factor
    return m.reshape(layers, 2, kv_heads * head_dim)


def plane_multipliers(config: CodecConfig, layers: int, kv_heads: int,
                      head_dim: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """What a layout needs: every channel's step multiplier [layers, 2, channels] (keys' table x head steps),
    and the part of it the row RMS is measured through (the table's alone); (None, None) for one step per
    row, and None as the second when the two are the same."""
    keys = key_multipliers(config, layers, kv_heads, head_dim)
    heads = head_multipliers(config, layers, kv_heads, head_dim)
    if keys is None and heads is None:
        return None, None
    table = torch.ones(layers, 2, kv_heads * head_dim)
    if keys is not None:
        table[:, 0] = keys
    if heads is None:
        return table, None
    return table * heads, table


def key_multipliers(config: CodecConfig, layers: int, kv_heads: int, head_dim: int) -> torch.Tensor | None:
    """Step multipliers [layers, kv_heads * head_dim] (fp32) of the key channels, or None for one step.

    A table measured on a model of another shape leaves the steps alone (like a named layer schedule on
    another layer count, the level stays usable anywhere); both sides decide alike from the shape.
    """
    if not config.key_channel_steps or config.quant != "rms" or config.key_channel_power == 0:
        return None
    table = json.loads(_read(config.key_channel_steps))
    energy = torch.tensor(table["query_energy"], dtype=torch.float64)
    if tuple(energy.shape) != (layers, kv_heads, head_dim):
        return None
    if not bool((energy > 0).all()):
        raise ConfigError(f"key_channel_steps {config.key_channel_steps!r}: query energies must be positive")
    log = energy.log().reshape(layers, -1)
    log = log - log.mean(1, keepdim=True)
    return (log * (-config.key_channel_power / 2)).exp().float()
