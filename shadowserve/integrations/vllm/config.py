"""``kv_connector_extra_config`` -> our own frozen config dataclasses, with the same validation.

Keys are the field names of :class:`~shadowserve.config.DataPlaneConfig` (``fetch_mode``,
``dataplane_cores``, ``chunk_size``, …) and :class:`~shadowserve.config.CodecConfig` (``quant``,
``lossless``, ``level``, …), plus ``kv_quality`` (lossless | high | balanced | compact, the default;
raw codec keys override it), ``store_url`` (required), ``model_fingerprint`` (optional: names
the model's KV when several deployments share a store) and ``load_failure`` (``recompute``, the
default, or ``fail``). An unknown key or a bad value is a :class:`ConfigError` that says which.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any

from shadowserve.config import CodecConfig, DataPlaneConfig, StoreConfig
from shadowserve.errors import ConfigError
from shadowserve.kvcache.levels import DEFAULT_QUALITY, codec_for_quality

_OWN_KEYS = ("store_url", "model_fingerprint", "load_failure", "kv_quality")
# Engine-side knobs of DataPlaneConfig that mean nothing inside vLLM (vLLM owns its own cores).
_NOT_FOR_VLLM = ("pin_cores",)
LOAD_FAILURE = ("recompute", "fail")


@dataclass(frozen=True)
class ConnectorConfig:
    """Everything both halves of the connector need, validated once."""

    store_url: str
    dataplane: DataPlaneConfig
    codec: CodecConfig
    model_fingerprint: str | None = None
    load_failure: str = "recompute"

    @property
    def enabled(self) -> bool:
        return self.dataplane.fetch_mode != "recompute"


def _fields(cls) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


def parse_extra_config(extra: dict[str, Any] | None, block_size: int) -> ConnectorConfig:
    """Validate ``kv_connector_extra_config`` against vLLM's ``block_size``."""
    extra = dict(extra or {})
    dp_keys = tuple(k for k in _fields(DataPlaneConfig) if k not in _NOT_FOR_VLLM)
    codec_keys = _fields(CodecConfig)
    unknown = sorted(set(extra) - set(dp_keys) - set(codec_keys) - set(_OWN_KEYS))
    if unknown:
        valid = ", ".join(sorted((*_OWN_KEYS, *dp_keys, *codec_keys)))
        raise ConfigError(f"unknown kv_connector_extra_config key(s) {unknown}: valid keys are {valid}")
    if "store_url" not in extra:
        raise ConfigError("kv_connector_extra_config needs store_url (e.g. shadowserve://127.0.0.1:7480)")
    store_url = str(extra["store_url"])
    StoreConfig(url=store_url)  # the scheme check and its message
    try:
        dp = DataPlaneConfig(**{k: extra[k] for k in dp_keys if k in extra})
        codec = codec_for_quality(str(extra.get("kv_quality", DEFAULT_QUALITY)),
                                  **{k: extra[k] for k in codec_keys if k in extra})
    except TypeError as exc:  # e.g. a string where a number belongs, caught by a comparison
        raise ConfigError(f"kv_connector_extra_config: {exc}") from None
    if dp.fetch_mode == "gpu":
        raise ConfigError("fetch_mode 'gpu' needs CUDA IPC, which the vLLM connector does not do yet: "
                          "use offload, thread or sync")
    if dp.chunk_size % block_size:
        raise ConfigError(f"chunk_size {dp.chunk_size} must be a multiple of vLLM's block size {block_size} "
                          f"(set chunk_size to {block_size * max(1, dp.chunk_size // block_size)} or "
                          "change vLLM's --block-size)")
    if dp.fetch_mode == "offload" and store_url.startswith("memory:"):
        raise ConfigError("a memory:// store lives inside vLLM's process, where the offload data plane "
                          "cannot see it: use file:///dir, shadowserve://host:port or redis://")
    load_failure = str(extra.get("load_failure", "recompute"))
    if load_failure not in LOAD_FAILURE:
        raise ConfigError(f"load_failure must be one of {', '.join(LOAD_FAILURE)}, got {load_failure!r}")
    fp = extra.get("model_fingerprint")
    if fp is not None and (not isinstance(fp, str) or not fp):
        raise ConfigError("model_fingerprint must be a non-empty string")
    return ConnectorConfig(store_url, dp, codec, fp, load_failure)


def model_fingerprint(vllm_config: Any, override: str | None = None) -> str:
    """Names the KV a model produces: keys of another model, dtype or sharding never match.

    vLLM gives no weights digest, so this hashes the model's name or path and revision, its HF
    config, the dtypes and the tensor-parallel size, plus the size and mtime of local weight files.
    """
    if override:
        return f"vllm:{override}"
    mc = vllm_config.model_config
    parts: dict[str, Any] = {
        "model": mc.model,
        "revision": getattr(mc, "revision", None),
        "dtype": str(mc.dtype),
        "kv_cache_dtype": str(vllm_config.cache_config.cache_dtype),
        "tp": vllm_config.parallel_config.tensor_parallel_size,
        "hf_config": mc.hf_config.to_json_string(use_diff=False),
    }
    if os.path.isdir(mc.model):
        files = sorted(f for f in os.listdir(mc.model) if f.endswith((".safetensors", ".bin", ".pt")))
        parts["weights"] = [(f, os.stat(os.path.join(mc.model, f)).st_size,
                             os.stat(os.path.join(mc.model, f)).st_mtime_ns) for f in files]
    digest = hashlib.blake2b(json.dumps(parts, sort_keys=True, default=str).encode(), digest_size=16).hexdigest()
    return f"vllm:{digest}"
