"""kv_connector_extra_config validation: our config dataclasses' checks, with messages that say what to fix.

Needs no vLLM: the parser only knows our config classes and vLLM's block size.
"""

from __future__ import annotations

import pytest

from shadowserve.errors import ConfigError
from shadowserve.integrations.vllm.config import parse_extra_config

URL = "shadowserve://127.0.0.1:7480"


def test_defaults_and_fields_pass_through():
    cfg = parse_extra_config({"store_url": URL, "quant": "none", "lossless": "lz4", "fetch_mode": "thread",
                              "dataplane_cores": "auto", "chunk_size": 512}, block_size=128)
    assert cfg.store_url == URL and cfg.enabled
    assert cfg.codec.quant == "none" and cfg.codec.lossless == "lz4"
    assert cfg.dataplane.fetch_mode == "thread" and cfg.dataplane.chunk_size == 512
    assert cfg.load_failure == "recompute"
    assert not parse_extra_config({"store_url": URL, "fetch_mode": "recompute"}, 128).enabled


@pytest.mark.parametrize("extra, message", [
    ({}, "needs store_url"),
    ({"store_url": "localhost:7480"}, "has no scheme"),
    ({"store_url": URL, "quantization": "none"}, "unknown kv_connector_extra_config key"),
    ({"store_url": URL, "quant": "int3"}, "unknown quant"),
    ({"store_url": URL, "fetch_mode": "turbo"}, "unknown fetch mode"),
    ({"store_url": URL, "fetch_mode": "gpu"}, "CUDA IPC"),
    ({"store_url": URL, "chunk_size": 192}, "multiple of vLLM's block size 128"),
    ({"store_url": URL, "chunk_size": "big"}, "kv_connector_extra_config"),
    ({"store_url": "memory://", "fetch_mode": "offload"}, "memory:// store"),
    ({"store_url": URL, "load_failure": "ignore"}, "load_failure"),
    ({"store_url": URL, "pin_cores": True}, "unknown kv_connector_extra_config key"),
])
def test_bad_config_is_a_config_error(extra, message):
    with pytest.raises(ConfigError, match=message):
        parse_extra_config(extra, block_size=128)


def test_kv_quality_names_the_codec_and_raw_keys_override_it():
    from shadowserve.kvcache.levels import QUALITY_LEVELS

    assert parse_extra_config({"store_url": URL}, 16).codec == QUALITY_LEVELS["balanced"]
    assert parse_extra_config({"store_url": URL, "kv_quality": "lossless"}, 16).codec == QUALITY_LEVELS["lossless"]
    cfg = parse_extra_config({"store_url": URL, "kv_quality": "high", "lossless": "lz4"}, 16).codec
    assert cfg.lossless == "lz4" and cfg.key_step == QUALITY_LEVELS["high"].key_step
    with pytest.raises(ConfigError, match="unknown kv_quality"):
        parse_extra_config({"store_url": URL, "kv_quality": "max"}, 16)
