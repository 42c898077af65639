"""Per-channel key steps from a measured query-energy table (kvcache/channel_steps.py)."""

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from shadowserve.config import CodecConfig
from shadowserve.dataplane.gpu_decode import _dequantize_on_device
from shadowserve.errors import ChunkFormatError, ConfigError
from shadowserve.kvcache import KVCodec
from shadowserve.kvcache import packing as pk
from shadowserve.kvcache.channel_steps import TABLE_DIR, key_multipliers, table_names
from tests.kvcache.conftest import FINGERPRINT, SHAPE, make_kv

REAL = (30, 2, 256, 3, 64)  # smollm2-135m's chunk: the shape its table was measured for
CHANNELS = CodecConfig(key_offsets=True, key_channel_steps="smollm2-135m")


def _decode(codec: KVCodec, blob: bytes, shape, dtype=torch.float32):
    staging = np.zeros(codec.max_staging_nbytes(shape), np.uint8)
    header = codec.decompress_into(blob, staging)
    return header, staging, codec.dequantize_into(header, staging, torch.empty(shape, dtype=dtype))


def test_the_shipped_table_gives_unit_geometric_mean_multipliers():
    assert "smollm2-135m" in table_names()
    m = key_multipliers(CHANNELS, 30, 3, 64)
    assert m.shape == (30, 192) and m.dtype == torch.float32
    assert torch.allclose(m.log().mean(1), torch.zeros(30), atol=1e-5)  # about the same bits per layer
    assert float(m.max() / m.min()) > 2  # the steps do differ between channels
    halves = m.view(30, 3, 2, 32)
    assert torch.equal(halves[:, :, 0], halves[:, :, 1])  # a RoPE pair shares its step
    table = json.loads((TABLE_DIR / "smollm2-135m.json").read_text())
    energy = torch.tensor(table["query_energy"], dtype=torch.float64).reshape(30, 192)
    # Finer steps where queries weigh the channel more, and power 1 squares power 0.5's multipliers.
    assert int(m[0].argmin()) == int(energy[0].argmax())
    m1 = key_multipliers(dataclasses.replace(CHANNELS, key_channel_power=1.0), 30, 3, 64)
    assert torch.allclose(m1, m * m, rtol=1e-5)
    assert key_multipliers(dataclasses.replace(CHANNELS, key_channel_power=0), 30, 3, 64) is None
    assert key_multipliers(CodecConfig(), 30, 3, 64) is None


def test_decoded_keys_keep_the_per_channel_bound():
    codec = KVCodec(CHANNELS, FINGERPRINT)
    kv = make_kv(REAL, seed=11)
    header, staging, out = _decode(codec, codec.encode(kv), REAL)
    bound = codec.error_bound(header, staging).view(REAL)
    err = (out - kv).abs()
    assert bool((err <= bound * (1 + 1e-5) + 1e-6).all())
    # The key bound of a channel is the row's step times the channel's multiplier.
    m = key_multipliers(CHANNELS, 30, 3, 64).view(30, 1, 3, 64)
    ratio = bound[:, 0] / bound[:, 0, :, :1, :1]
    assert torch.allclose(ratio, (m / m[:, :, :1, :1]).expand_as(ratio), rtol=1e-3)
    # Channels that queries weigh most are decoded more exactly than with one step per row.
    fine = m.view(30, 192).argmin(1)
    plain = KVCodec(CodecConfig(key_offsets=True), FINGERPRINT)
    _, _, out_plain = _decode(plain, plain.encode(kv), REAL)
    keys, keys_plain = (o[:, 0].reshape(30, 256, 192) for o in (out, out_plain))
    truth = kv[:, 0].reshape(30, 256, 192)
    idx = fine.view(30, 1, 1).expand(30, 256, 1)
    assert float((keys - truth).gather(2, idx).abs().mean()) < float((keys_plain - truth).gather(2, idx).abs().mean())


def test_channel_steps_are_part_of_the_format_id():
    plain = KVCodec(CodecConfig(key_offsets=True), FINGERPRINT)
    chan = KVCodec(CHANNELS, FINGERPRINT)
    chan1 = KVCodec(dataclasses.replace(CHANNELS, key_channel_power=1.0), FINGERPRINT)
    assert len({plain.kv_format_id, chan.kv_format_id, chan1.kv_format_id}) == 3
    assert KVCodec(dataclasses.replace(CHANNELS, lossless="deflate"), FINGERPRINT).kv_format_id == chan.kv_format_id
    blob = chan.encode(make_kv(REAL, seed=12))
    with pytest.raises(ChunkFormatError):  # another quantizer's chunk is never misread
        _decode(plain, blob, REAL)
    with pytest.raises(ChunkFormatError):
        _decode(chan1, blob, REAL)


def test_a_table_for_another_shape_leaves_the_steps_alone():
    # The table is smollm2-135m's; on another model the level keeps working with one step per row.
    assert key_multipliers(CHANNELS, SHAPE[0], SHAPE[3], SHAPE[4]) is None
    kv = make_kv(seed=13)
    chan, plain = KVCodec(CHANNELS, FINGERPRINT), KVCodec(CodecConfig(key_offsets=True), FINGERPRINT)
    assert torch.equal(_decode(chan, chan.encode(kv), SHAPE)[2], _decode(plain, plain.encode(kv), SHAPE)[2])


def test_bad_tables_and_powers_are_refused():
    with pytest.raises(ConfigError, match="measured table"):
        KVCodec(CodecConfig(key_channel_steps="no-such-model"), FINGERPRINT)
    for power in (-0.5, 2.5, True, "0.5"):
        with pytest.raises(ConfigError):
            CodecConfig(key_channel_steps="smollm2-135m", key_channel_power=power)
    with pytest.raises(ConfigError):
        CodecConfig(key_channel_steps="../etc/passwd")
    # Other quantizers leave a level's table unused, as they do its layer schedule.
    assert key_multipliers(dataclasses.replace(CHANNELS, quant="int8"), 30, 3, 64) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_the_device_decoder_matches_the_host_bit_for_bit(dtype):
    codec = KVCodec(dataclasses.replace(CHANNELS, layer_steps="smollm2-135m-qa-5x"), FINGERPRINT)
    header, staging, host = _decode(codec, codec.encode(make_kv(REAL, seed=14)), REAL, dtype)
    layout = codec.layout_of(REAL)
    scales, symbols = pk.split_staging(layout, torch.from_numpy(staging), header.staging_nbytes)
    out = torch.empty(REAL, dtype=dtype)
    _dequantize_on_device(layout, scales, symbols, out, torch.empty(out.numel(), dtype=torch.int8),
                          (layout.steps, torch.empty(REAL)))
    assert torch.equal(out, host)


def test_multipliers_follow_the_power_law():
    m = key_multipliers(CHANNELS, 30, 3, 64)
    table = json.loads((TABLE_DIR / "smollm2-135m.json").read_text())
    e = torch.tensor(table["query_energy"], dtype=torch.float64).reshape(30, 192)
    expected = e[4] ** -0.25
    expected = expected / math.exp(float(expected.log().mean()))
    assert torch.allclose(m[4].double(), expected, rtol=1e-5)
