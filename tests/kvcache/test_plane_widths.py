"""Packed chunks store each plane 4 or 8 bits wide: a finely quantized plane costs a byte per symbol,
not an escape per symbol, and decodes to exactly the KV of the one-byte layout."""

import dataclasses

import numpy as np
import pytest
import torch

from shadowserve.config import CodecConfig
from shadowserve.dataplane.gpu_decode import _dequantize_on_device
from shadowserve.errors import ChunkFormatError
from shadowserve.kvcache import KVCodec
from shadowserve.kvcache import format as fmt
from shadowserve.kvcache import packing as pk
from shadowserve.kvcache import quant as q
from tests.kvcache.conftest import FINGERPRINT, SHAPE, make_kv

# Layer 1's keys and layer 2's values 10x finer than the rest: most of their symbols leave [-8, 7].
FINE = "1,1,0.1,1,1,0.1,1,1"


def _decode(codec: KVCodec, blob: bytes, dtype=torch.float32):
    staging = np.zeros(codec.max_staging_nbytes(SHAPE), np.uint8)
    header = codec.decompress_into(blob, staging)
    return header, staging, codec.dequantize_into(header, staging, torch.empty(SHAPE, dtype=dtype))


def _packing(codec: KVCodec, header, staging) -> pk.Packing:
    return pk.read_packing(codec.layout_of(SHAPE), torch.from_numpy(staging), header.staging_nbytes)


@pytest.mark.parametrize("key_offsets", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fine_planes_go_one_byte_wide_and_decode_exactly(key_offsets, dtype):
    config = CodecConfig(layer_steps=FINE, key_offsets=key_offsets)
    codec = KVCodec(config, FINGERPRINT)
    plain = KVCodec(dataclasses.replace(config, pack_nibbles=False), FINGERPRINT)
    kv = make_kv(seed=12)
    header, staging, out = _decode(codec, codec.encode(kv), dtype)
    packing = _packing(codec, header, staging)
    assert packing.wide == (False, False, True, False, False, True, False, False)
    assert packing.key_offsets == key_offsets
    layout = codec.layout_of(SHAPE)
    assert header.staging_nbytes == layout.packed_nbytes(packing.escapes, key_offsets, wide=2) < layout.staging_nbytes
    assert torch.equal(out, _decode(codec, plain.encode(kv), dtype)[2])  # same KV as one byte per symbol
    # The device decoder (gpu mode's kernels, on the CPU here) unpacks the same mixed widths.
    scales, symbols = pk.split_staging(layout, torch.from_numpy(staging), header.staging_nbytes)
    assert symbols.runs == ((0, 2, False), (2, 3, True), (3, 5, False), (5, 6, True), (6, 8, False))
    dev = torch.empty(SHAPE, dtype=dtype)
    _dequantize_on_device(layout, scales, symbols, dev, torch.empty(dev.numel(), dtype=torch.int8))
    assert torch.equal(dev, out)


def test_wide_planes_cost_less_than_escaping_them():
    codec = KVCodec(CodecConfig(layer_steps=FINE, lossless="none"), FINGERPRINT)
    layout = codec.layout_of(SHAPE)
    staging = np.zeros(layout.staging_nbytes, np.uint8)
    scales, symbols = pk.split_staging(layout, torch.from_numpy(staging), layout.staging_nbytes)
    q.quantize(make_kv(seed=13).reshape(4, 2, 32, 32), layout, scales, symbols)
    widened = pk.pack_staging(layout, staging)
    assert widened is not None and widened.nbytes < 0.7 * layout.staging_nbytes
    out = torch.empty(layout.symbols_nbytes, dtype=torch.int8)
    pk.unpack_into(pk.split_staging(layout, torch.from_numpy(widened), widened.nbytes)[1], out)
    assert torch.equal(out, symbols)
    # Escaping every out-of-range symbol instead: over 1/32 of the chunk, so it would not pack at all.
    assert pk.pack_staging(layout, staging, wide_share=1.0) is None
    assert pk.pack_staging(layout, staging, wide_share=-1.0) is None  # every plane wide: no gain, not packed
    # Two planes of eight byte-wide: packed symbols take 68% of one byte each, too little saved for a
    # decoder's unpacking when the bar is 60% (the default bar, 70%, packs them).
    assert pk.pack_staging(layout, staging, max_share=0.6) is None


def test_cachegen_widens_only_its_32_bin_values():
    codec = KVCodec(CodecConfig(quant="cachegen", lossless="lz4"), FINGERPRINT)
    header, staging, _ = _decode(codec, codec.encode(make_kv(seed=3)))
    # Layer 0 (of 4) has 32 bins: its values reach +-15; its keys' absmax is the outlier channel, so
    # their other symbols stay small and the outliers escape.
    assert _packing(codec, header, staging).wide == (False, True) + (False,) * 6


def _reseal(codec: KVCodec, staging: np.ndarray) -> bytes:
    payload = np.frombuffer(codec.lossless.compress(staging), np.uint8)
    return fmt.pack(SHAPE, torch.float32, codec.codec_id, FINGERPRINT, staging.nbytes, payload)


@pytest.mark.parametrize("where,value", [("flags", 4), ("width", 2), ("count", 2**31)])
def test_a_malformed_symbol_table_is_refused(where, value):
    codec = KVCodec(CodecConfig(layer_steps=FINE), FINGERPRINT)
    header, staging, _ = _decode(codec, codec.encode(make_kv(seed=14)))
    bad = staging[: header.staging_nbytes].copy()
    t0 = codec.layout_of(SHAPE).symbols_offset
    if where == "count":
        bad[t0: t0 + 4] = np.array([value], "<u4").view(np.uint8)
    else:
        bad[t0 + (4 if where == "flags" else 5 + 2)] = value
    with pytest.raises(ChunkFormatError, match="symbol table is malformed"):
        _decode(codec, _reseal(codec, bad))


def test_a_table_that_disagrees_with_the_size_is_refused():
    codec = KVCodec(CodecConfig(layer_steps=FINE), FINGERPRINT)
    header, staging, _ = _decode(codec, codec.encode(make_kv(seed=15)))
    bad = staging[: header.staging_nbytes].copy()
    bad[codec.layout_of(SHAPE).symbols_offset + 5 + 2] = 0  # a wide plane claimed 4 bits wide
    with pytest.raises(ChunkFormatError, match="no symbol layout"):
        _decode(codec, _reseal(codec, bad))


def test_only_the_lossy_formats_changed_keys():
    """Packed staging changed in KV formats 3 and 4, so lossy chunks from earlier builds are misses
    (never misread, and never refused by an older build that shares the store); raw chunks stage the
    KV itself, unchanged, so lossless caches keep their keys."""
    from shadowserve.kvcache.codec import kv_format_id_of

    assert kv_format_id_of(CodecConfig()) == "sskv4/rms:k0.5:v1"
    assert kv_format_id_of(CodecConfig(quant="cachegen")) == "sskv4/cachegen"
    assert kv_format_id_of(CodecConfig(quant="none")) == "sskv2/none"
