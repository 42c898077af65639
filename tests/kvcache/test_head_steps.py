"""Per-head steps: single KV heads of single planes pinned finer (CodecConfig.head_steps)."""

import dataclasses

import numpy as np
import pytest
import torch

from shadowserve.config import CodecConfig
from shadowserve.dataplane.gpu_decode import _dequantize_on_device
from shadowserve.errors import ConfigError
from shadowserve.kvcache import KVCodec
from shadowserve.kvcache import packing as pk
from shadowserve.kvcache.channel_steps import head_multipliers, head_steps_text, listed_head_steps
from tests.kvcache.conftest import FINGERPRINT, SHAPE, make_kv

REAL = (30, 2, 256, 3, 64)  # smollm2-135m's chunk: the shape the named set is for
CANDIDATE = CodecConfig(key_offsets=True, layer_steps="smollm2-135m-qa-5x-heads", key_step=0.3,
                        key_channel_steps="smollm2-135m", head_steps="smollm2-135m-retrieval")


def _decode(codec: KVCodec, blob: bytes, shape=SHAPE, dtype=torch.float32):
    staging = np.zeros(codec.max_staging_nbytes(shape), np.uint8)
    header = codec.decompress_into(blob, staging)
    return header, staging, codec.dequantize_into(header, staging, torch.empty(shape, dtype=dtype))


def _bound(codec: KVCodec, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    header, staging, out = _decode(codec, codec.encode(kv), tuple(kv.shape))
    layers, _, tokens, heads, head_dim = kv.shape
    return codec.error_bound(header, staging).view(layers, 2, tokens, heads, head_dim), out


def test_a_pinned_head_is_finer_and_leaves_the_rest_of_its_row_alone():
    kv = make_kv(seed=21)
    plain = KVCodec(CodecConfig(), FINGERPRINT)
    pinned = KVCodec(CodecConfig(head_steps="1k0:0.5,2v1:0.25"), FINGERPRINT)
    b_plain, out_plain = _bound(plain, kv)
    b_pin, out_pin = _bound(pinned, kv)
    # The row's step is measured without the pin (no clipping at these steps), so only the pinned head moves.
    assert torch.equal(b_pin[1, 0, :, 0], b_plain[1, 0, :, 0] * 0.5)
    assert torch.equal(b_pin[2, 1, :, 1], b_plain[2, 1, :, 1] * 0.25)
    assert torch.equal(b_pin[1, 0, :, 1], b_plain[1, 0, :, 1])
    assert torch.equal(b_pin[0], b_plain[0]) and torch.equal(b_pin[3], b_plain[3])
    for out, bound in ((out_plain, b_plain), (out_pin, b_pin)):
        assert bool(((out - kv).abs() <= bound * (1 + 1e-5) + 1e-6).all())
    err = lambda out, i: float((out - kv)[i].abs().mean())  # noqa: E731
    assert err(out_pin, (1, 0, slice(None), 0)) < 0.7 * err(out_plain, (1, 0, slice(None), 0))
    assert err(out_pin, (2, 1, slice(None), 1)) < 0.5 * err(out_plain, (2, 1, slice(None), 1))


def test_a_pin_too_fine_for_127_levels_coarsens_the_row_instead_of_clipping():
    kv = make_kv(seed=22)
    codec = KVCodec(CodecConfig(head_steps="0k0:0.01"), FINGERPRINT)
    bound, out = _bound(codec, kv)
    assert bool(((out - kv).abs() <= bound * (1 + 1e-5) + 1e-6).all())
    plain_bound, _ = _bound(KVCodec(CodecConfig(), FINGERPRINT), kv)
    # The other head pays for it, in the rows where the pinned head's largest value needs more than 127 levels.
    assert bool((bound[0, 0, :, 1] >= plain_bound[0, 0, :, 1]).all())
    assert float((bound[0, 0, :, 1, 0] > plain_bound[0, 0, :, 1, 0]).float().mean()) > 0.8


def test_head_steps_work_with_channel_steps_and_match_on_the_device():
    kv = make_kv(REAL, seed=23)
    codec = KVCodec(CANDIDATE, FINGERPRINT)
    header, staging, host = _decode(codec, codec.encode(kv), REAL, torch.float16)
    layout = codec.layout_of(REAL)
    assert layout.scaled == (tuple(sorted({7, 8, 17, 18, 20, 23} | set(range(30)))), (17, 18))
    scales, symbols = pk.split_staging(layout, torch.from_numpy(staging), header.staging_nbytes)
    out = torch.empty(REAL, dtype=torch.float16)
    _dequantize_on_device(layout, scales, symbols, out, torch.empty(out.numel(), dtype=torch.int8),
                          (layout.steps, torch.empty(REAL)))
    assert torch.equal(out, host)
    # Without the pins, the same row steps: the RMS sees the channel table, never the head steps.
    unpinned = KVCodec(dataclasses.replace(CANDIDATE, head_steps=""), FINGERPRINT)
    b_pin, _ = _bound(codec, kv)
    b_plain, _ = _bound(unpinned, kv)
    # 7k2 at half its step: its row keeps its step except where 127 levels no longer cover the head.
    assert bool((b_pin[7, 0, :, :2] >= b_plain[7, 0, :, :2]).all())
    assert float((b_pin[7, 0, :, 0, 0] == b_plain[7, 0, :, 0, 0]).float().mean()) > 0.5
    assert bool((b_pin[7, 0, :, 2] < b_plain[7, 0, :, 2]).all())


def test_head_steps_are_part_of_the_format_id_and_named_sets_expand():
    ids = {KVCodec(CodecConfig(head_steps=h), FINGERPRINT).kv_format_id for h in ("", "1k0:0.5", "1k0:0.25", "1v0:0.5")}
    assert len(ids) == 4
    listed = head_steps_text(listed_head_steps(CodecConfig(head_steps="smollm2-135m-retrieval")))
    assert KVCodec(CodecConfig(head_steps=listed), FINGERPRINT).kv_format_id == \
        KVCodec(CodecConfig(head_steps="smollm2-135m-retrieval"), FINGERPRINT).kv_format_id


def test_a_named_set_for_another_shape_is_unused_and_a_listed_head_must_exist():
    assert head_multipliers(CodecConfig(head_steps="smollm2-135m-retrieval"), *SHAPE[0:1], *SHAPE[3:]) is None
    kv = make_kv(seed=24)
    named, plain = KVCodec(CodecConfig(head_steps="smollm2-135m-retrieval"), FINGERPRINT), KVCodec(CodecConfig(), FINGERPRINT)
    assert torch.equal(_decode(named, named.encode(kv))[2], _decode(plain, plain.encode(kv))[2])
    for spec in ("7k0:0.5", "1k5:0.5"):  # SHAPE has 4 layers of 2 KV heads
        with pytest.raises(ConfigError, match="the model has"):
            KVCodec(CodecConfig(head_steps=spec), FINGERPRINT).encode(kv)


@pytest.mark.parametrize("spec", ["18k2", "18x2:0.5", "18k2:1.5", "18k2:0", "k2:0.5", "18k2:0.5;1v0:0.5"])
def test_malformed_head_steps_are_refused(spec):
    with pytest.raises(ConfigError):
        CodecConfig(head_steps=spec)


def test_duplicates_unknown_names_and_other_quantizers_are_refused():
    with pytest.raises(ConfigError, match="twice"):
        KVCodec(CodecConfig(head_steps="1k0:0.5,1k0:0.25"), FINGERPRINT)
    with pytest.raises(ConfigError, match="fitted set"):
        KVCodec(CodecConfig(head_steps="no-such-set"), FINGERPRINT)
    with pytest.raises(ConfigError, match="rms"):
        CodecConfig(quant="int8", head_steps="1k0:0.5")
    # A level's named set under a raw quant override is left unused, like its schedule.
    assert head_multipliers(CodecConfig(quant="int8", head_steps="smollm2-135m-retrieval"), 30, 3, 64) is None
