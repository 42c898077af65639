"""Configuration: one frozen dataclass per component, validated on construction.

Components receive their own config object explicitly; there is no global state. Human-friendly
sizes (``256MiB``, ``8GiB``), rates (``10gbit``) and durations are parsed by ``values.py``.

The three config modules: this one defines and validates each component's settings;
``settings.py`` fills them from defaults < YAML < ``SHADOWSERVE_*`` env < flags for a serving
process; ``commands/config.py`` is the ``shadowserve config show`` subcommand that prints the result.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from shadowserve.cores import split_cores
from shadowserve.errors import ConfigError
from shadowserve.values import parse_duration, parse_rate, parse_size, redact_url

DTYPES = ("float32", "bfloat16", "float16")
LINEAR_KERNELS = ("auto", "dense", "fp16")  # see model/linear_kernels.py


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
    # Weight matmuls: "auto" (fbgemm's packed fp16 GEMM for float32 on CPU, else dense), "dense", "fp16".
    linear_kernel: str = "auto"
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
        if self.linear_kernel not in LINEAR_KERNELS:
            raise ConfigError(
                f"unknown linear_kernel {self.linear_kernel!r}: choose one of {', '.join(LINEAR_KERNELS)}"
            )


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
            raise ConfigError(f"store url {redact_url(self.url)!r} has no scheme "
                              "(memory://, file:///dir, shadowserve://host:port, ...)")
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


FETCH_MODES = ("recompute", "sync", "thread", "offload", "gpu")
BASELINE_PLACEMENTS = ("reserved", "engine")
FETCH_POLICIES = ("auto", "always", "never")


@dataclass(frozen=True)
class DataPlaneConfig:
    """Where and how the fetch/save pipeline runs, and how the control plane guards it."""

    fetch_mode: str = "offload"
    # Cores reserved for the data plane ("auto": the last quarter of usable cores, at least one);
    # the engine gets the rest, in every mode, so modes differ only in where the pipeline runs.
    dataplane_cores: str = "auto"
    # Where ``sync`` and ``thread`` run their pipeline threads: "reserved" (the data-plane cores: the
    # fairness rule, isolating what the process boundary buys) or "engine" (the engine's own cores beside
    # the model, nothing reserved in use: the paper's CacheGen-Async placement). ``offload`` is always reserved.
    baseline_cores: str = "reserved"
    chunk_size: int = 256  # tokens per stored chunk; a multiple of the engine block size
    fetch_workers: int = 2
    decompress_workers: int = 1
    dequantize_workers: int = 1
    save_workers: int = 1
    receive_slots: int = 8
    staging_slots: int = 4
    kv_slots: int = 4
    lookup_workers: int = 2
    fetch_timeout: float = 30.0  # seconds before a fetch is abandoned and its prefix recomputed
    heartbeat_interval: float = 0.5
    heartbeat_timeout: float = 5.0  # a silent data plane for this long counts as hung and is restarted
    store_probe_interval: float = 5.0  # seconds between store reachability probes (a fifth of it while down)
    save: bool = True  # write computed full chunks back to the store
    pin_cores: bool = False  # pin the engine process to its cores (benchmarks and the CLI do)
    # The data plane's compressed host-memory tier in front of the store (dataplane/local_tier.py); 0: off.
    local_tier: str | int = 0
    local_tier_admission: str = "first"  # store-fetched chunks enter on their "first" or "second" fetch
    # Which prefix hits to fetch: "auto" (those whose predicted fetch beats computing them:
    # controlplane/fetch_policy.py), "always" (every hit) or "never" (compute everything).
    fetch_policy: str = "auto"
    # "auto" re-measures a store it stopped fetching from: after this many decisions that left it out, or
    # this many seconds since it last served, one decision fetches up to one store chunk anyway (0: never).
    fetch_explore_every: int = 32
    fetch_explore_seconds: float = 60.0

    def __post_init__(self) -> None:
        if self.fetch_mode not in FETCH_MODES:
            raise ConfigError(f"unknown fetch mode {self.fetch_mode!r}: choose one of {', '.join(FETCH_MODES)}")
        if self.chunk_size < 16 or self.chunk_size % 16:
            raise ConfigError(f"chunk_size must be a positive multiple of 16, got {self.chunk_size}")
        for name in ("fetch_workers", "decompress_workers", "dequantize_workers", "save_workers",
                     "receive_slots", "staging_slots", "kv_slots", "lookup_workers"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1")
        if self.baseline_cores not in BASELINE_PLACEMENTS:
            raise ConfigError(f"unknown baseline_cores {self.baseline_cores!r}: choose one of "
                              f"{', '.join(BASELINE_PLACEMENTS)}")
        if self.store_probe_interval <= 0:
            raise ConfigError("store_probe_interval must be > 0")
        parse_size(self.local_tier)
        if self.local_tier_admission not in ("first", "second"):
            raise ConfigError(f"local_tier_admission must be first or second, got {self.local_tier_admission!r}")
        if self.fetch_policy not in FETCH_POLICIES:
            raise ConfigError(f"unknown fetch_policy {self.fetch_policy!r}: choose one of {', '.join(FETCH_POLICIES)}")
        if self.fetch_explore_every < 0 or self.fetch_explore_seconds < 0:
            raise ConfigError("fetch_explore_every and fetch_explore_seconds must be >= 0 (0: never explore)")
        if self.fetch_timeout <= 0 or self.heartbeat_interval <= 0 or self.heartbeat_timeout <= self.heartbeat_interval:
            raise ConfigError("timeouts must be > 0 and heartbeat_timeout > heartbeat_interval")

    def stage_workers(self) -> dict[str, int]:
        """Threads per pipeline stage (scatter has one: it only copies into blocks)."""
        return {"fetch": self.fetch_workers, "decompress": self.decompress_workers,
                "dequantize": self.dequantize_workers, "scatter": 1, "save": self.save_workers}

    def split_cores(self) -> tuple[list[int], list[int]]:
        """(engine cores, data-plane cores) for ``dataplane_cores`` (see ``shadowserve.cores``)."""
        return split_cores(self.dataplane_cores)

    def pipeline_on_engine_cores(self) -> bool:
        """True when this mode's pipeline shares the engine's cores (a baseline placed as in the paper)."""
        return self.baseline_cores == "engine" and self.fetch_mode in ("sync", "thread")


# Each lossless stage's (default, lowest, highest) level; 0 in a config means the default. The level
# never changes the decoded bytes, so it is not part of the codec id. kvcache/lossless.py reads it.
LOSSLESS_LEVELS: dict[str, tuple[int, int, int]] = {
    "deflate": (6, 0, 12),
    "zstd": (1, -7, 22),
    "lz4": (0, 0, 16),
    "none": (0, 0, 0),
}


def check_lossless_level(stage: str, level: int) -> None:
    """Raise ConfigError if ``level`` is outside what ``stage`` accepts (0 means its default)."""
    if stage not in LOSSLESS_LEVELS:
        raise ConfigError(f"unknown lossless stage {stage!r}: choose one of {', '.join(LOSSLESS_LEVELS)}")
    _, lo, hi = LOSSLESS_LEVELS[stage]
    if level != 0 and not lo <= level <= hi:
        raise ConfigError(f"{stage} level must be in [{lo}, {hi}] (or 0 for the default), got {level}")


# The block sizes a blocked lossless payload may use (kvcache/blocks.py): multiples of 4 KiB up to the
# 64 KiB that nvCOMP's batched Deflate decoder takes per block. 0 in a config: one stream per chunk.
LOSSLESS_BLOCK_STEP = 4096
LOSSLESS_BLOCK_MAX = 64 * 1024


def is_lossless_block(nbytes: object) -> bool:
    """True if ``nbytes`` is a block size a blocked payload may use."""
    return (isinstance(nbytes, int) and not isinstance(nbytes, bool)
            and LOSSLESS_BLOCK_STEP <= nbytes <= LOSSLESS_BLOCK_MAX and nbytes % LOSSLESS_BLOCK_STEP == 0)


# A fitted schedule's name (kvcache/schedules.py), as opposed to a list of numbers.
_SCHEDULE_NAME = re.compile(r"^[a-z][a-z0-9._-]*$")
_HEAD_STEP = re.compile(r"^\d+[kv]\d+:\d*\.?\d+$")  # <layer><k|v><head>:<multiplier>

QUANT_MODES = ("rms", "cachegen", "uniform", "int8", "kivi", "none")
LOSSLESS_MODES = ("zstd", "deflate", "lz4", "none")


@dataclass(frozen=True)
class CodecConfig:
    """How KV chunks are quantized and compressed (see docs/codec.md for the measured trade-offs).

    ``quant``: ``rms`` (default: step = key_step/value_step x the token's RMS, entropy-coded),
    ``cachegen`` (CacheGen's per-layer-group bins), ``uniform`` (``bins`` levels everywhere),
    ``int8`` (255 levels), ``kivi`` (per-channel keys, per-token values, ``bins`` levels) or
    ``none`` (bit-exact). ``lossless``: the entropy/LZ stage; ``level`` 0 picks its default.
    ``layer_steps`` (``rms`` only): comma-separated multipliers of both steps, one per layer, or
    two per layer (key then value: ``k0,v0,k1,v1,...``), so the layers and planes a model is
    sensitive in get finer steps (``bench codec --layer-sensitivity`` finds them; the decoder is the
    same whatever the steps); empty means the same steps in every layer. Or the name of a fitted
    schedule in ``kvcache/schedules.py`` (e.g. ``smollm2-135m-balanced``), which on a model of
    another layer count applies its mean key and value multipliers everywhere instead of failing,
    and which quantizers other than ``rms`` leave unused. ``pack_nibbles``: store a lossy chunk's
    symbols two per byte when nearly all fit in 4 bits (decompresses about twice as fast; the
    decoded KV is the same either way, and decoders read both layouts). ``key_offsets`` (with
    ``pack_nibbles``): store each key channel's symbols relative to their median in the chunk, so
    the outlier channels' large, steady symbols fit in nibbles (about 9% smaller chunks, the same
    decoded KV; decoders read chunks with and without). ``min_saving``: a chunk
    whose lossless stage saves less than this share of its bytes is stored without it (as ``none``),
    so fetching it costs no decompression for next to no transfer (like ZFS's 12.5% rule; 0 keeps
    the stage always). Decoders read either, so it is a transport choice, not part of the chunk keys.
    ``lossless_block``: compress the staging bytes as independent blocks of this many bytes (a
    multiple of 4 KiB, at most 64 KiB; a version-3 chunk), which GPU batched decompressors decode
    in parallel; 0 writes one stream per chunk (version 2). A transport choice too: decoders read
    both, and the decoded KV and chunk keys are the same (docs/codec.md, "Blocked lossless payloads").
    ``key_channel_steps`` (``rms`` only): the name of a measured query-energy table
    (``kvcache/channel_steps/``, e.g. ``smollm2-135m``) that gives each key channel its own step,
    finer where queries weigh the channel more, as ``energy ** (-key_channel_power / 2)`` (geometric
    mean 1 per layer; docs/codec.md, "Per-channel key steps"); empty: one step per key row.
    ``head_steps`` (``rms`` only): finer steps for single KV heads of single planes, where a model's
    retrieval happens: a fitted set's name (``kvcache/schedules.py``, e.g. ``smollm2-135m-retrieval``,
    left unused on a model of another shape) or a list ``<layer><k|v><head>:<multiplier>``, e.g.
    ``18k2:0.3,23k0:0.3``. The row RMS is measured without them, so a pinned head gets finer while
    the rest of its row keeps its step (docs/codec.md, "Steps per head").
    """

    quant: str = "rms"
    lossless: str = "zstd"
    level: int = 0
    bins: int = 16
    key_step: float = 0.5
    value_step: float = 1.0
    layer_steps: str = ""
    pack_nibbles: bool = True
    min_saving: float = 0.125
    key_offsets: bool = False
    lossless_block: int = 0
    key_channel_steps: str = ""
    key_channel_power: float = 0.5
    head_steps: str = ""

    def __post_init__(self) -> None:
        if self.quant not in QUANT_MODES:
            raise ConfigError(f"unknown quant {self.quant!r}: choose one of {', '.join(QUANT_MODES)}")
        if self.lossless not in LOSSLESS_MODES:
            raise ConfigError(f"unknown lossless stage {self.lossless!r}: choose one of {', '.join(LOSSLESS_MODES)}")
        if not 3 <= self.bins <= 255:
            raise ConfigError(f"bins must be in [3, 255], got {self.bins}")
        for name in ("key_step", "value_step"):
            step = getattr(self, name)
            if not 0.01 <= step <= 16:
                raise ConfigError(f"{name} must be in [0.01, 16] (a multiple of the token's RMS), got {step}")
        check_lossless_level(self.lossless, self.level)
        if not isinstance(self.pack_nibbles, bool):
            raise ConfigError(f"pack_nibbles must be true or false, got {self.pack_nibbles!r}")
        if not isinstance(self.key_offsets, bool):
            raise ConfigError(f"key_offsets must be true or false, got {self.key_offsets!r}")
        if isinstance(self.min_saving, bool) or not isinstance(self.min_saving, (int, float)) \
                or not 0 <= self.min_saving < 1:
            raise ConfigError(f"min_saving must be a number in [0, 1), got {self.min_saving!r}")
        if self.lossless_block != 0 and not is_lossless_block(self.lossless_block):
            raise ConfigError(f"lossless_block must be 0 (one stream) or a multiple of {LOSSLESS_BLOCK_STEP} "
                              f"up to {LOSSLESS_BLOCK_MAX} bytes, got {self.lossless_block!r}")
        if self.key_channel_steps and not _SCHEDULE_NAME.match(self.key_channel_steps):
            raise ConfigError(f"key_channel_steps must name a measured table, got {self.key_channel_steps!r}")
        if isinstance(self.key_channel_power, bool) or not isinstance(self.key_channel_power, (int, float)) \
                or not 0 <= self.key_channel_power <= 2:
            raise ConfigError(f"key_channel_power must be a number in [0, 2], got {self.key_channel_power!r}")
        heads = self.head_steps.strip()
        if heads and not _SCHEDULE_NAME.match(heads):
            if not all(_HEAD_STEP.match(item.strip()) for item in heads.split(",")):
                raise ConfigError(f"head_steps must be a fitted set's name or a list like '18k2:0.3,23k0:0.3', "
                                  f"got {self.head_steps!r}")
            if self.quant != "rms":
                raise ConfigError(f"head_steps applies to quant 'rms' only, not {self.quant!r}")
            for item in heads.split(","):
                if not 0.01 <= float(item.split(":")[1]) <= 1:
                    raise ConfigError(f"head_steps multipliers must be in [0.01, 1] (finer only), got {item.strip()!r}")
        steps = self.layer_steps.strip()
        if steps and not _SCHEDULE_NAME.match(steps):
            # A list of multipliers; a schedule's name is resolved (and checked) by kvcache.schedules.
            try:
                multipliers = [float(x) for x in steps.split(",")]
            except ValueError:
                raise ConfigError(f"layer_steps must be comma-separated numbers or a fitted schedule's name, "
                                  f"got {self.layer_steps!r}") from None
            # A named schedule (a quality level's) is left unused by the other quantizers, so a raw
            # ``quant`` override on top of a level works; an explicit list is a mistake with them.
            if self.quant != "rms":
                raise ConfigError(f"layer_steps applies to quant 'rms' only, not {self.quant!r}")
            for m in multipliers:
                if not 0.05 <= m <= 20:
                    raise ConfigError(f"layer_steps multipliers must be in [0.05, 20], got {m:g}")


@dataclass(frozen=True)
class ServerConfig:
    """The OpenAI-compatible HTTP front end: where it listens and what it accepts."""

    host: str = "127.0.0.1"  # loopback unless told otherwise
    port: int = 8000
    served_model_name: str | None = None  # the name clients send as "model" (default: the engine's model)
    api_key: str | None = None  # when set, requests need "Authorization: Bearer <key>"
    max_request_size: str | int = "8MiB"  # larger bodies get 413 before they are read
    max_n: int = 8  # most completions one request may ask for ("n")
    log_level: str = "info"

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be in 0..65535, got {self.port}")
        if parse_size(self.max_request_size) < 1024:
            raise ConfigError("max_request_size must be at least 1KiB")
        if self.max_n < 1:
            raise ConfigError("max_n must be >= 1")
        if self.log_level not in ("critical", "error", "warning", "info", "debug"):
            raise ConfigError(f"unknown log_level {self.log_level!r}: use critical, error, warning, info or debug")
