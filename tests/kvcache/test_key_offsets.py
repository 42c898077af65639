"""Key symbols stored relative to their channel's median, and steps per (layer, K/V) plane."""

import dataclasses

import numpy as np
import pytest
import torch

from shadowserve.config import CodecConfig
from shadowserve.dataplane.gpu_decode import _dequantize_on_device
from shadowserve.errors import ChunkFormatError, ConfigError
from shadowserve.kvcache import KVCodec
from shadowserve.kvcache import format as fmt
from shadowserve.kvcache import packing as pk
from shadowserve.kvcache.layout import Layout
from shadowserve.kvcache.plan import plan
from tests.kvcache.conftest import FINGERPRINT, SHAPE, make_kv

CONFIGS = [
    CodecConfig(),
    CodecConfig(quant="rms", key_step=0.3, value_step=2.0, lossless="deflate"),
    CodecConfig(layer_steps="0.5,2,1,1,2,0.5,1,1"),  # per (layer, K/V)
    CodecConfig(quant="uniform", bins=5, lossless="none"),
    CodecConfig(quant="kivi", bins=16, lossless="lz4"),
]


def _offsets(config: CodecConfig) -> CodecConfig:
    return dataclasses.replace(config, key_offsets=True)


def _decode(codec: KVCodec, blob: bytes, dtype=torch.float32, shape=SHAPE):
    staging = np.zeros(codec.max_staging_nbytes(shape), np.uint8)
    header = codec.decompress_into(blob, staging)
    return header, staging, codec.dequantize_into(header, staging, torch.empty(shape, dtype=dtype))


def _packing(layout, staging, header) -> pk.Packing:
    return pk.read_packing(layout, torch.from_numpy(staging), header.staging_nbytes)


def _shifted_kv(seed: int) -> torch.Tensor:
    kv = make_kv(seed=seed)
    kv[:, 0, :, 1, 5] += 30.0  # a key channel with a steady offset, as real keys have
    return kv


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.quant}-{c.lossless}-{c.layer_steps or 'flat'}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_key_offsets_decode_to_the_same_kv(config, dtype):
    with_offsets, plain = KVCodec(_offsets(config), FINGERPRINT), KVCodec(config, FINGERPRINT)
    assert with_offsets.codec_id == plain.codec_id  # a storage detail: same keys, same decoded KV
    kv = _shifted_kv(seed=3)
    ho, so, out_o = _decode(plain, with_offsets.encode(kv), dtype)  # any decoder of the format reads it
    hp, sp, out_p = _decode(with_offsets, plain.encode(kv), dtype)  # and the other way round
    layout = plain.layout_of(SHAPE)
    assert _packing(layout, so, ho).key_offsets is True
    assert _packing(layout, sp, hp).key_offsets is False
    assert torch.equal(out_o, out_p)


def test_key_offsets_remove_escapes_of_steady_channels():
    kv = _shifted_kv(seed=4)
    plain, with_offsets = KVCodec(CodecConfig(lossless="none"), FINGERPRINT), \
        KVCodec(CodecConfig(lossless="none", key_offsets=True), FINGERPRINT)
    hp, sp, _ = _decode(plain, plain.encode(kv))
    ho, staging, _ = _decode(with_offsets, with_offsets.encode(kv))
    layout = plain.layout_of(SHAPE)
    esc_plain, esc_offsets = _packing(layout, sp, hp).escapes, _packing(layout, staging, ho).escapes
    assert esc_offsets < esc_plain
    # The offsets hold each key channel's median symbol; the steady channel's is far from 0.
    _, symbols = pk.split_staging(layout, torch.from_numpy(staging), ho.staging_nbytes)
    assert symbols.key_offsets.shape == (SHAPE[0], 1, SHAPE[3] * SHAPE[4])
    assert int(symbols.key_offsets[:, 0, 16 + 5].abs().min()) > 8


def test_one_byte_layout_ignores_key_offsets():
    config = CodecConfig(key_offsets=True, pack_nibbles=False)
    codec = KVCodec(config, FINGERPRINT)
    kv = _shifted_kv(seed=5)
    header, _, out = _decode(codec, codec.encode(kv))
    assert header.staging_nbytes == codec.layout_of(SHAPE).staging_nbytes
    assert torch.equal(out, _decode(codec, KVCodec(CodecConfig(), FINGERPRINT).encode(kv))[2])


def test_the_device_decoder_applies_key_offsets():
    codec = KVCodec(CodecConfig(key_offsets=True), FINGERPRINT)
    header, staging, host = _decode(codec, codec.encode(_shifted_kv(seed=6)))
    layout = codec.layout_of(SHAPE)
    scales, symbols = pk.split_staging(layout, torch.from_numpy(staging), header.staging_nbytes)
    assert symbols.key_offsets is not None
    out = torch.empty(SHAPE)
    _dequantize_on_device(layout, scales, symbols, out, torch.empty(out.numel(), dtype=torch.int8))
    assert torch.equal(out, host)


def test_packed_sizes_follow_the_symbol_table():
    for shape in [SHAPE, (30, 2, 256, 3, 64), (3, 2, 8, 1, 10), (2, 2, 6, 1, 10)]:
        layout = Layout(plan("rms", shape[0]), shape[2], shape[3] * shape[4])
        assert layout.offsets_nbytes % 4 == 0 and layout.offsets_nbytes >= layout.num_offsets
        if not layout.offsets_packable:
            continue
        assert layout.packed_nbytes(0) < layout.packed_nbytes(0, offsets=True) < layout.staging_nbytes
        for k in (0, layout.max_escapes):
            for offsets in (False, True):
                for wide in (0, 1, layout.planes // 3):
                    n = layout.packed_nbytes(k, offsets, wide)
                    if n >= layout.staging_nbytes:
                        continue
                    widths = [1] * wide + [0] * (layout.planes - wide)
                    staging = torch.zeros(n, dtype=torch.uint8)
                    t0 = layout.symbols_offset
                    staging[t0: t0 + 4] = torch.tensor(list(k.to_bytes(4, "little")), dtype=torch.uint8)
                    staging[t0 + 4] = int(offsets)
                    staging[t0 + 5: t0 + 5 + layout.planes] = torch.tensor(widths, dtype=torch.uint8)
                    assert pk.read_packing(layout, staging, n) == pk.Packing(k, offsets, tuple(map(bool, widths)))
                    with pytest.raises(ChunkFormatError, match="no symbol layout"):
                        pk.read_packing(layout, staging, n - 1)


def _reseal(codec: KVCodec, staging: np.ndarray) -> bytes:
    payload = np.frombuffer(codec.lossless.compress(staging), np.uint8)
    return fmt.pack(SHAPE, torch.float32, codec.codec_id, FINGERPRINT, staging.nbytes, payload)


def test_corrupt_offset_chunks_are_refused():
    codec = KVCodec(CodecConfig(key_offsets=True), FINGERPRINT)
    blob = codec.encode(_shifted_kv(seed=7))
    header, staging, _ = _decode(codec, blob)
    layout = codec.layout_of(SHAPE)
    packing = _packing(layout, staging, header)
    k = packing.escapes
    assert packing.key_offsets and k > 0
    good = staging[: header.staging_nbytes].copy()
    # an escape position past the end (a broken encoder: the checksums pass)
    bad = good.copy()
    g0 = layout.escapes_offset(sum(packing.wide), offsets=True)
    bad[g0 + 4 * (k - 1): g0 + 4 * k] = np.array([layout.symbols_nbytes], "<u4").view(np.uint8)
    with pytest.raises(ChunkFormatError, match="outside"):
        _decode(codec, _reseal(codec, bad))
    # a staging size between the layouts
    with pytest.raises(ChunkFormatError, match="no symbol layout"):
        _decode(codec, _reseal(codec, good[:-1]))
    # flipped payload bytes
    corrupt = bytearray(blob)
    corrupt[-3] ^= 0x40
    with pytest.raises(ChunkFormatError):
        _decode(codec, bytes(corrupt))


def test_key_offsets_must_be_a_bool():
    with pytest.raises(ConfigError, match="key_offsets"):
        CodecConfig(key_offsets="yes")


def test_steps_per_layer_and_plane():
    kv = make_kv(seed=8)
    errors = {}
    for steps in ("", "0.25,1,1,1,1,1,1,1", "1,4,1,1,1,1,1,1"):
        codec = KVCodec(CodecConfig(layer_steps=steps), FINGERPRINT)
        out = _decode(codec, codec.encode(kv))[2]
        errors[steps] = [[((out[i, p] - kv[i, p]).norm() / kv[i, p].norm()).item() for p in range(2)]
                         for i in range(SHAPE[0])]
    flat, finer_key0, coarser_value0 = errors[""], errors["0.25,1,1,1,1,1,1,1"], errors["1,4,1,1,1,1,1,1"]
    assert finer_key0[0][0] < 0.5 * flat[0][0] and finer_key0[0][1] == flat[0][1]
    assert coarser_value0[0][1] > 1.5 * flat[0][1] and coarser_value0[0][0] == flat[0][0]
    assert finer_key0[1:] == flat[1:] == coarser_value0[1:]
    rules = plan("rms", 2, key_step=0.5, value_step=1.0, layer_steps=(0.5, 2.0, 1.0, 3.0))
    assert [(k.param, v.param) for k, v in rules] == [(0.25, 2.0), (0.5, 3.0)]
    ids = {KVCodec(CodecConfig(layer_steps=x), "m").codec_id
           for x in ("", "1,1,1,1", "1,1,1,1,1,1,1,1", "2,1,1,1,1,1,1,1")}
    assert len(ids) == 4  # per-plane schedules are part of the KV format, like per-layer ones
    codec = KVCodec(CodecConfig(layer_steps="1,1,1,1,1,1"), FINGERPRINT)  # 6: neither 4 nor 8
    with pytest.raises(ConfigError, match="give 4, one per layer, or 8"):
        codec.encode(kv)


@pytest.mark.parametrize("name", ["smollm2-135m-high", "smollm2-135m-balanced", "smollm2-135m-qa-balanced",
                                  "smollm2-135m-compact"])
def test_named_schedules_fit_their_model_and_adapt_to_others(name):
    from shadowserve.kvcache.schedules import SCHEDULES, mean_pair, multipliers, step_multipliers

    mults = multipliers(name)
    assert len(mults) == 60 and SCHEDULES[name]  # SmolLM2-135M: 30 layers, a key and a value step each
    named, listed = CodecConfig(layer_steps=name), CodecConfig(layer_steps=SCHEDULES[name])
    assert step_multipliers(named) == step_multipliers(listed)
    assert KVCodec(named, "m").codec_id == KVCodec(listed, "m").codec_id  # the same KV on the fitted model
    rules = plan("rms", 30, layer_steps=mults, adapt=True)
    assert [(k.param, v.param) for k, v in rules] == [(0.5 * k, 1.0 * v) for k, v in zip(mults[0::2], mults[1::2])]
    # On a 4-layer model: the named schedule applies its mean multipliers, a list is refused.
    mk, mv = mean_pair(mults)
    codec = KVCodec(named, FINGERPRINT)
    assert [(r[0].param, r[1].param) for r in codec.layout_of(SHAPE).rules] == [(0.5 * mk, 1.0 * mv)] * SHAPE[0]
    kv = make_kv(seed=9)
    out = _decode(codec, codec.encode(kv))[2]
    flat = KVCodec(CodecConfig(key_step=0.5 * mk, value_step=1.0 * mv), FINGERPRINT)
    assert torch.equal(out, _decode(flat, flat.encode(kv))[2])
    with pytest.raises(ConfigError, match="60 multipliers but the model has 4 layers"):
        KVCodec(listed, FINGERPRINT).encode(kv)
    with pytest.raises(ConfigError, match="fitted schedule"):
        KVCodec(CodecConfig(layer_steps="smollm2-135m-nonesuch"), FINGERPRINT)  # the name is checked by kvcache


def test_named_schedules_are_the_fit_of_their_recorded_measurements():
    import json
    from pathlib import Path

    from shadowserve.kvcache.schedules import SCHEDULES, blend, fit, multipliers, pin

    docs = Path(__file__).parents[2] / "docs"
    data = json.loads((docs / "codec-plane-fit.json").read_text())
    answers = json.loads((docs / "codec-task-fit.json").read_text())
    texts = ("calib", "calib2")
    kl = np.mean([data["kl_at_default_step"][t] for t in texts], 0).tolist()
    assert set(data["lambdas"]) | set(answers["lambdas"]) | set(answers["derived"]) \
        | set(answers["unpinned_lambdas"]) == set(SCHEDULES)
    for name, (lam, which) in data["lambdas"].items():
        bits = np.mean([data[which][t] for t in texts], 0).tolist()
        grid = data["grid_byte" if which == "bits_byte" else "grid_nibble"]
        assert fit(kl, bits, grid, lam) == multipliers(name)
    # Fitted to answers as well as text, then the retrieval planes pinned (docs/codec-task-fit.json).
    bits = np.mean([data["bits_nibble"][t] for t in texts], 0).tolist()
    costs = blend(answers["answer_kl"], kl, answers["answer_weight"])
    pins = {(layer, kv): m for layer, kv, m in answers["pins"]}
    for name, lam in answers["lambdas"].items():
        assert pin(fit(costs, bits, data["grid_nibble"], lam), pins) == multipliers(name)
    for name, lam in answers["unpinned_lambdas"].items():  # pinned per head instead (HEAD_STEPS)
        assert fit(costs, bits, data["grid_nibble"], lam) == multipliers(name)
    for name, how in answers["derived"].items():
        assert pin(multipliers(how["base"]), {(layer, kv): m for layer, kv, m in how["pins"]}) == multipliers(name)


def test_a_named_schedule_is_unused_by_other_quantizers():
    # A quality level's schedule with a raw quant override on top (e.g. --set codec.quant=int8).
    config = CodecConfig(quant="int8", layer_steps="smollm2-135m-balanced", key_offsets=True)
    codec = KVCodec(config, FINGERPRINT)
    assert codec.codec_id == KVCodec(CodecConfig(quant="int8"), FINGERPRINT).codec_id
    kv = make_kv(seed=10)
    plain = KVCodec(CodecConfig(quant="int8"), FINGERPRINT)
    assert torch.equal(_decode(codec, codec.encode(kv))[2], _decode(plain, plain.encode(kv))[2])


def test_chunks_too_small_for_the_offsets_block_pack_without_it():
    shape = (2, 2, 1, 1, 64)  # one token: the offsets would cost as much as the symbols
    layout = Layout(plan("rms", 2), 1, 64)
    assert layout.packable and not layout.offsets_packable
    codec = KVCodec(CodecConfig(key_offsets=True), FINGERPRINT)
    kv = make_kv(shape, seed=11)
    header, staging, out = _decode(codec, codec.encode(kv), shape=shape)
    assert header.staging_nbytes < layout.staging_nbytes and not _packing(layout, staging, header).key_offsets
    plain = KVCodec(CodecConfig(), FINGERPRINT)
    assert torch.equal(out, _decode(plain, plain.encode(kv), shape=shape)[2])
