"""Per-channel key steps: finer steps in the key channels that queries weigh most.

An error ``e`` in key channel ``c`` moves an attention logit by ``q_c * e``, and queries put most of
their weight on a few channels. So instead of one step for every channel of a key row, channel ``c``
of layer ``l`` gets ``step x m[l, c]`` with ``m = energy ** (-power / 2)``, where ``energy`` is the
mean squared query of that channel measured on calibration text (``scripts/fit_channel_steps.py``,
tables in ``channel_steps/``; ``power=1`` minimizes the logit error for the bits, smaller powers go
part way). The multipliers have a geometric mean of 1 per layer, so the bits stay about the same
while the error moves out of the channels queries look at.

Both sides need the multipliers: the encoder divides keys by them before quantizing, the decoder
multiplies them back (quant.py). They are fixed by the codec config (a named table and a power), which
the chunk keys and the container's format id carry, so a chunk is only ever decoded with its own.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from shadowserve.config import CodecConfig
from shadowserve.errors import ConfigError

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
    """What the KV format id says about channel steps: '' when off, else a digest of table and power."""
    if not config.key_channel_steps:
        return ""
    digest = hashlib.sha256(_read(config.key_channel_steps) + f"|{config.key_channel_power:g}".encode())
    return f":C{digest.hexdigest()[:12]}"


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
