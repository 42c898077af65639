"""Configuration: one frozen dataclass per component, validated on construction.

Components receive their own config object explicitly; there is no global state. Human-friendly
sizes (``256MiB``, ``8GiB``) and rates (``10gbit``, ``1.25GB/s``) are parsed here once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from shadowserve.errors import ConfigError

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}

# Rates in bits per second; "/s" and "ps" suffixes are accepted and ignored.
_RATE_UNITS_BITS = {
    "bit": 1,
    "kbit": 1e3,
    "mbit": 1e6,
    "gbit": 1e9,
    "tbit": 1e12,
    "b": 8,
    "kb": 8e3,
    "mb": 8e6,
    "gb": 8e9,
    "kib": 8 * 1024,
    "mib": 8 * 1024**2,
    "gib": 8 * 1024**3,
}

_NUM_UNIT = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(value: str | int | float) -> int:
    """Parse a byte size such as ``4096``, ``256MiB`` or ``8GiB`` into bytes."""
    if isinstance(value, bool):
        raise ConfigError(f"invalid size {value!r}")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ConfigError(f"size must be >= 0, got {value!r}")
        return int(value)
    m = _NUM_UNIT.match(str(value))
    if not m or m.group(2).lower() not in _SIZE_UNITS:
        raise ConfigError(f"invalid size {value!r}: use a number with an optional unit like 512MiB or 8GiB")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])


def parse_rate(value: str | int | float) -> float:
    """Parse a link rate such as ``10gbit`` or ``1.25GB/s`` into **bytes per second**.

    A bare number is taken as bits per second, as ``tc`` does.
    """
    if isinstance(value, bool):
        raise ConfigError(f"invalid rate {value!r}")
    if isinstance(value, (int, float)):
        bits = float(value)
    else:
        text = str(value).strip().lower().replace("/s", "").replace("ps", "")
        m = _NUM_UNIT.match(text)
        if not m:
            raise ConfigError(f"invalid rate {value!r}: use a number with a unit like 10gbit or 500mbit")
        unit = m.group(2) or "bit"
        if unit not in _RATE_UNITS_BITS:
            raise ConfigError(f"invalid rate unit in {value!r}: use bit, kbit, mbit, gbit, or B/KB/MB/GB")
        bits = float(m.group(1)) * _RATE_UNITS_BITS[unit]
    if bits <= 0:
        raise ConfigError(f"rate must be > 0, got {value!r}")
    return bits / 8.0


DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class EngineConfig:
    """How the serving engine runs a model: memory, batching and numerics."""

    model: str = "smollm2-135m"
    dtype: str = "float32"
    device: str = "cpu"
    block_size: int = 16
    # KV pool size: number of blocks, or derived from kv_cache_memory when 0.
    num_kv_blocks: int = 0
    kv_cache_memory: str | int = "1GiB"
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 4096
    max_model_len: int = 0  # 0: the model's own context length
    enable_prefix_caching: bool = True
    # Allocate the KV pool in named shared memory so a data-plane process can write into it.
    shared_kv_pool: bool = False
    num_threads: int = 0  # torch intra-op threads; 0 leaves torch's default
    seed: int = 0

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ConfigError(f"unknown dtype {self.dtype!r}: choose one of {', '.join(DTYPES)}")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ConfigError(f"block_size must be a power of two >= 1, got {self.block_size}")
        if self.num_kv_blocks < 0:
            raise ConfigError("num_kv_blocks must be >= 0")
        parse_size(self.kv_cache_memory)
        if self.max_num_seqs < 1:
            raise ConfigError("max_num_seqs must be >= 1")
        if self.max_num_batched_tokens < self.block_size:
            raise ConfigError("max_num_batched_tokens must be >= block_size")
        if self.max_model_len < 0:
            raise ConfigError("max_model_len must be >= 0")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ConfigError(f"unknown device {self.device!r}: use cpu or cuda[:N]")


_DURATION_UNITS = {"": 1.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9, "m": 60.0, "min": 60.0}
_DURATION = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-zA-Zµ]*)\s*$")


def parse_duration(value: str | int | float) -> float:
    """Parse a duration such as ``0.2ms``, ``5s`` or ``30`` (seconds) into seconds."""
    if isinstance(value, bool):
        raise ConfigError(f"invalid duration {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        m = _DURATION.match(str(value))
        if not m or m.group(2).lower() not in _DURATION_UNITS:
            raise ConfigError(f"invalid duration {value!r}: use a number with a unit like 0.2ms or 5s")
        seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2).lower()]
    if seconds < 0:
        raise ConfigError(f"duration must be >= 0, got {value!r}")
    return seconds


@dataclass(frozen=True)
class StoreConfig:
    """Where KV chunks live, how the link to them behaves, and the store server's limits.

    Client fields (``url``, timeouts, ``bandwidth``/``latency``, ``token_file``) are defaults
    that query parameters in ``url`` override; server fields are used by ``store serve``.
    """

    url: str = "memory://"
    connect_timeout: float = 5.0
    timeout: float = 30.0
    bandwidth: str | None = None  # e.g. "10gbit": emulated link on the client's receive path
    latency: str | None = None  # e.g. "0.2ms": added before each response's first byte
    token_file: str | None = None
    # store server
    host: str = "127.0.0.1"
    port: int = 7480
    capacity: str | int = "8GiB"
    max_value_size: str | int = "512MiB"
    server_bandwidth: str | None = None  # pace the server's sends, shared by all connections
    max_connections: int = 1024

    def __post_init__(self) -> None:
        if "://" not in self.url:
            raise ConfigError(f"store url {self.url!r} has no scheme (memory://, file:///dir, shadowserve://host:port, ...)")
        if self.connect_timeout <= 0 or self.timeout <= 0:
            raise ConfigError("store timeouts must be > 0")
        if self.bandwidth is not None:
            parse_rate(self.bandwidth)
        if self.server_bandwidth is not None:
            parse_rate(self.server_bandwidth)
        if self.latency is not None:
            parse_duration(self.latency)
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be in 0..65535, got {self.port}")
        if parse_size(self.capacity) <= 0:
            raise ConfigError("store capacity must be > 0")
        if parse_size(self.max_value_size) <= 0:
            raise ConfigError("max_value_size must be > 0")
        if self.max_connections < 1:
            raise ConfigError("max_connections must be >= 1")
