"""Symbols stored two per byte: the same KV as one per byte, fewer bytes, and checked like the rest."""

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
from shadowserve.kvcache.layout import Layout
from tests.kvcache.conftest import FINGERPRINT, SHAPE, make_kv

PACKABLE = [
    CodecConfig(),
    CodecConfig(quant="rms", key_step=0.3, value_step=2.0, lossless="deflate"),
    CodecConfig(quant="uniform", bins=5, lossless="none"),
    CodecConfig(quant="kivi", bins=16, lossless="zstd"),
    # 32 bins in layer 0 over this data's wide outlier channel: layer 0's keys go one byte per symbol.
    CodecConfig(quant="cachegen", lossless="lz4"),
]


def _one_per_byte(config: CodecConfig) -> KVCodec:
    return KVCodec(dataclasses.replace(config, pack_nibbles=False), FINGERPRINT)


def _decode(codec: KVCodec, blob: bytes, dtype=torch.float32, offset: int = 0):
    staging = np.zeros(codec.max_staging_nbytes(SHAPE) + offset, np.uint8)[offset:]
    header = codec.decompress_into(blob, staging)
    return header, staging, codec.dequantize_into(header, staging, torch.empty(SHAPE, dtype=dtype))


@pytest.mark.parametrize("config", PACKABLE, ids=lambda c: f"{c.quant}-{c.lossless}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_chunks_decode_to_the_same_kv_as_one_byte_symbols(config, dtype):
    packed, plain = KVCodec(config, FINGERPRINT), _one_per_byte(config)
    assert packed.codec_id == plain.codec_id  # a storage detail: same keys, same decoded KV
    kv = make_kv(seed=3)
    hp, _, out_p = _decode(packed, packed.encode(kv), dtype)
    hb, _, out_b = _decode(packed, plain.encode(kv), dtype)  # a packing codec still reads one-byte chunks
    layout = packed.layout_of(SHAPE)
    assert hb.staging_nbytes == layout.staging_nbytes
    assert hp.staging_nbytes < layout.staging_nbytes
    assert torch.equal(out_p, out_b)


def test_outliers_are_escaped_and_restored_exactly():
    codec = KVCodec(CodecConfig(), FINGERPRINT)
    kv = make_kv(seed=5)  # an outlier key channel 20x the rest: symbols far beyond [-8, 7]
    header, staging, out = _decode(codec, codec.encode(kv))
    layout = codec.layout_of(SHAPE)
    escapes = pk.read_packing(layout, torch.from_numpy(staging), header.staging_nbytes).escapes
    assert escapes > 0
    _, symbols = pk.split_staging(layout, torch.from_numpy(staging), header.staging_nbytes)
    assert bool(((symbols.values < -8) | (symbols.values > 7)).all())  # only out-of-nibble symbols escape
    # The escaped values decode to the exact symbol x scale of the one-byte layout, outliers included.
    _, _, plain = _decode(codec, _one_per_byte(CodecConfig()).encode(kv))
    assert torch.equal(out, plain)
    assert float(out[:, 0, :, :, 3].abs().max()) > 10 * float(out[:, 1].abs().median())


def test_wide_symbols_stay_one_per_byte():
    codec = KVCodec(CodecConfig(quant="int8"), FINGERPRINT)  # 255 levels: most symbols escape
    header, _, out = _decode(codec, codec.encode(make_kv(seed=1)))
    assert header.staging_nbytes == codec.layout_of(SHAPE).staging_nbytes


def test_odd_planes_are_not_packed():
    shape = (2, 2, 3, 1, 5)  # 15 values per plane: no pairs
    codec = KVCodec(CodecConfig(quant="uniform", bins=5), FINGERPRINT)
    kv = make_kv(shape, seed=2)
    blob = codec.encode(kv)
    staging = np.zeros(codec.max_staging_nbytes(shape), np.uint8)
    header = codec.decompress_into(blob, staging)
    assert header.staging_nbytes == codec.layout_of(shape).staging_nbytes
    out = codec.dequantize_into(header, staging, torch.empty(shape))
    assert float((out - kv).abs().max()) < float(kv.abs().max())


def test_a_staging_buffer_off_a_word_boundary_still_decodes():
    codec = KVCodec(CodecConfig(), FINGERPRINT)
    blob = codec.encode(make_kv(seed=4))
    assert torch.equal(_decode(codec, blob, offset=1)[2], _decode(codec, blob)[2])


def _reseal(codec: KVCodec, staging: np.ndarray) -> bytes:
    """A container with a valid checksum around hand-made staging bytes (a broken encoder)."""
    payload = np.frombuffer(codec.lossless.compress(staging), np.uint8)
    return fmt.pack(SHAPE, torch.float32, codec.codec_id, FINGERPRINT, staging.nbytes, payload)


def _packed_staging(codec: KVCodec) -> tuple[np.ndarray, Layout, int]:
    header, staging, _ = _decode(codec, codec.encode(make_kv(seed=5)))
    layout = codec.layout_of(SHAPE)
    staging = staging[: header.staging_nbytes].copy()
    return staging, layout, pk.read_packing(layout, torch.from_numpy(staging), header.staging_nbytes)


def test_escape_positions_outside_the_chunk_are_refused():
    codec = KVCodec(CodecConfig(), FINGERPRINT)
    staging, layout, packing = _packed_staging(codec)
    k, g0 = packing.escapes, layout.escapes_offset(sum(packing.wide))
    gaps = staging[g0: g0 + 4 * k].view("<u4")
    gaps[-1] = layout.symbols_nbytes  # the last escape lands past the end
    with pytest.raises(ChunkFormatError, match="outside"):
        _decode(codec, _reseal(codec, staging))
    gaps[-1] = 2**31 + 5  # a negative gap
    with pytest.raises(ChunkFormatError, match="outside"):
        _decode(codec, _reseal(codec, staging))


def test_a_staging_size_no_layout_has_is_refused():
    codec = KVCodec(CodecConfig(), FINGERPRINT)
    staging, layout, packing = _packed_staging(codec)
    for size in (staging.nbytes - 1, layout.escapes_offset(sum(packing.wide)) - 4, layout.staging_nbytes + 8):
        bad = np.zeros(size, np.uint8)
        bad[: min(size, staging.nbytes)] = staging[:size]
        with pytest.raises(ChunkFormatError, match="no symbol layout"):
            _decode(codec, _reseal(codec, bad))


@pytest.mark.parametrize("pack", [True, False])
def test_the_device_decoder_matches_the_host_decoder(pack):
    """The ``gpu`` mode's torch kernels, run on the CPU: same KV from either symbol layout."""
    codec = KVCodec(CodecConfig(pack_nibbles=pack), FINGERPRINT)
    header, staging, host = _decode(codec, codec.encode(make_kv(seed=6)))
    layout = codec.layout_of(SHAPE)
    scales, symbols = pk.split_staging(layout, torch.from_numpy(staging), header.staging_nbytes)
    assert isinstance(symbols, pk.PackedSymbols) == pack
    out = torch.empty(SHAPE)
    _dequantize_on_device(layout, scales, symbols, out, torch.empty(out.numel(), dtype=torch.int8))
    assert torch.equal(out, host)


def _pack_with(codec: KVCodec, kv: torch.Tensor, token_pairs: bool) -> bytes:
    """``kv`` encoded with the packer's token pairs on or off (off: a version-3 build's layout)."""
    default = pk.pack_staging
    pk.pack_staging = lambda *a, **k: default(*a, **k, token_pairs=token_pairs)
    try:
        return codec.encode(kv)
    finally:
        pk.pack_staging = default


def _smooth_kv(shape=SHAPE, seed=0) -> torch.Tensor:
    """KV whose channels drift slowly along the tokens, as real models' do."""
    g = torch.Generator().manual_seed(seed)
    kv = 0.25 * torch.randn(shape, generator=g).cumsum(2) + 0.1 * torch.randn(shape, generator=g)
    kv *= torch.rand(shape[:2] + (1,) + shape[3:], generator=g) * 4 + 0.2  # channels of many sizes
    return kv


def test_token_pairs_decode_to_the_same_kv_and_old_chunks_still_read():
    codec = KVCodec(CodecConfig(), FINGERPRINT)
    kv = make_kv(seed=7)
    blob_pairs, blob_old = _pack_with(codec, kv, True), _pack_with(codec, kv, False)
    layout = codec.layout_of(SHAPE)
    hp, sp, out_pairs = _decode(codec, blob_pairs)
    ho, so, out_old = _decode(codec, blob_old)
    assert pk.read_packing(layout, torch.from_numpy(sp), hp.staging_nbytes).token_pairs
    assert not pk.read_packing(layout, torch.from_numpy(so), ho.staging_nbytes).token_pairs
    assert torch.equal(out_pairs, out_old)
    _, _, plain = _decode(codec, _one_per_byte(CodecConfig()).encode(kv))
    assert torch.equal(out_pairs, plain)


@pytest.mark.parametrize("config", [CodecConfig(), CodecConfig(key_step=0.3, value_step=0.6)], ids=["default", "fine"])
def test_token_pairs_make_smooth_kv_smaller(config):
    codec = KVCodec(config, FINGERPRINT)
    kv = _smooth_kv((4, 2, 256, 2, 32), seed=3)
    assert len(_pack_with(codec, kv, True)) < 0.98 * len(_pack_with(codec, kv, False))


def test_a_chunk_of_odd_tokens_pairs_the_old_way():
    shape = (2, 2, 3, 2, 4)  # 24 symbols per plane: packable, but no token pairs
    codec = KVCodec(CodecConfig(quant="uniform", bins=5), FINGERPRINT)
    kv = make_kv(shape, seed=8)
    blob = codec.encode(kv)
    staging = np.zeros(codec.max_staging_nbytes(shape), np.uint8)
    header = codec.decompress_into(blob, staging)
    layout = codec.layout_of(shape)
    packing = pk.read_packing(layout, torch.from_numpy(staging), header.staging_nbytes)
    assert packing is not None and not packing.token_pairs
    out = codec.dequantize_into(header, staging, torch.empty(shape))
    plain = KVCodec(CodecConfig(quant="uniform", bins=5, pack_nibbles=False), FINGERPRINT)
    assert torch.equal(out, plain.decode(plain.encode(kv), torch.empty(shape)))
    staging[layout.symbols_offset + 4] |= 2  # claims token pairs in an odd chunk: a broken encoder
    bad = staging[: header.staging_nbytes].copy()
    payload = np.frombuffer(codec.lossless.compress(bad), np.uint8)
    with pytest.raises(ChunkFormatError, match="odd token count"):
        codec.decode(fmt.pack(shape, torch.float32, codec.codec_id, FINGERPRINT, bad.nbytes, payload),
                     torch.empty(shape))
