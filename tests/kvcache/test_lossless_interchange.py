"""The lossless stage is a transport choice: chunks that differ only in it share keys, and any decoder
of their KV format reads them, whatever stage it would write with itself."""

import struct

import numpy as np
import pytest
import torch
import xxhash

from shadowserve.config import LOSSLESS_MODES, CodecConfig
from shadowserve.errors import ChunkFormatError, ConfigError
from shadowserve.kvcache import KVCodec
from shadowserve.kvcache.chunking import chunk_keys, key_seed
from tests.kvcache.conftest import FINGERPRINT, SHAPE, make_kv


def _decode(codec: KVCodec, blob: bytes, dtype: torch.dtype) -> torch.Tensor:
    staging = np.zeros(codec.max_staging_nbytes(SHAPE), np.uint8)
    header = codec.decompress_into(blob, staging)
    return codec.dequantize_into(header, staging, torch.empty(SHAPE, dtype=dtype))


@pytest.mark.parametrize("quant", ["rms", "none"])
def test_every_stage_reads_every_other_stages_chunks(quant):
    kv = make_kv(dtype=torch.float16)
    # min_saving=0: each chunk keeps its stage even where the stage saves little.
    codecs = {stage: KVCodec(CodecConfig(quant=quant, lossless=stage, min_saving=0), FINGERPRINT)
              for stage in LOSSLESS_MODES}
    blobs = {stage: c.encode(kv) for stage, c in codecs.items()}
    assert len({c.codec_id for c in codecs.values()}) == len(LOSSLESS_MODES)  # headers say which stage
    assert len({c.kv_format_id for c in codecs.values()}) == 1
    reference = _decode(codecs["zstd"], blobs["zstd"], torch.float16)
    if quant == "none":
        assert torch.equal(reference, kv)
    for reader in codecs.values():
        for stage, blob in blobs.items():
            assert reader.read_header(blob).lossless == stage
            assert torch.equal(_decode(reader, blob, torch.float16), reference), (reader.codec_id, stage)


def test_keys_follow_the_kv_format_not_the_lossless_stage():
    tokens = list(range(1000, 1512))

    def keys(config: CodecConfig) -> list[bytes]:
        return chunk_keys(tokens, 256, key_seed(FINGERPRINT, KVCodec(config, FINGERPRINT).kv_format_id))

    assert keys(CodecConfig(lossless="zstd")) == keys(CodecConfig(lossless="none")) == keys(CodecConfig(lossless="lz4"))
    assert keys(CodecConfig()) != keys(CodecConfig(key_step=0.25))  # another quantizer: other KV, other keys
    assert keys(CodecConfig()) != keys(CodecConfig(quant="int8"))


def test_a_chunk_naming_an_unknown_stage_is_refused():
    codec = KVCodec(CodecConfig(min_saving=0), FINGERPRINT)
    blob = codec.encode(make_kv())
    hlen = struct.unpack_from("<H", blob, 6)[0]
    head = bytes(blob[: hlen - 8])
    assert head.count(b"/zstd") == 1
    head = head.replace(b"/zstd", b"/brot")  # same length, header checksum made valid again
    forged = head + struct.pack("<Q", xxhash.xxh3_64_intdigest(head)) + blob[hlen:]
    with pytest.raises(ChunkFormatError, match="unknown lossless stage 'brot'"):
        _decode(codec, forged, torch.float32)


def test_a_payload_that_is_not_what_its_header_names_is_refused():
    """A zstd payload relabelled "none" (checksums made valid again) fails as corrupt, not as garbage KV."""
    codec = KVCodec(CodecConfig(min_saving=0), FINGERPRINT)
    blob = codec.encode(make_kv())
    hlen = struct.unpack_from("<H", blob, 6)[0]
    head = bytes(blob[: hlen - 8]).replace(b"/zstd", b"/none")
    forged = head + struct.pack("<Q", xxhash.xxh3_64_intdigest(head)) + blob[hlen:]
    with pytest.raises(ChunkFormatError, match="expected"):
        _decode(codec, forged, torch.float32)


@pytest.mark.parametrize("stage", ["zstd", "deflate", "lz4"])
def test_a_stage_that_saves_too_little_is_skipped_per_chunk(stage):
    """Random float bits barely compress: the chunk is stored raw, and still decodes bit-exactly."""
    kv = make_kv(dtype=torch.float32)
    skipping = KVCodec(CodecConfig(quant="none", lossless=stage), FINGERPRINT)
    keeping = KVCodec(CodecConfig(quant="none", lossless=stage, min_saving=0), FINGERPRINT)
    raw_blob, kept_blob = skipping.encode(kv), keeping.encode(kv)
    assert skipping.read_header(raw_blob).lossless == "none"
    assert keeping.read_header(kept_blob).lossless == stage
    assert len(kept_blob) > len(raw_blob) * (1 - 0.125)  # it really saved less than the threshold
    for reader in (skipping, keeping):
        for blob in (raw_blob, kept_blob):
            assert torch.equal(_decode(reader, blob, torch.float32), kv)
    assert len(raw_blob) <= skipping.max_encoded_nbytes(SHAPE)


def test_a_stage_that_pays_is_kept():
    """Quantized symbols (and zeros) compress well: the default codec keeps zstd for them."""
    codec = KVCodec(CodecConfig(), FINGERPRINT)
    for kv in (make_kv(), torch.zeros(SHAPE)):
        assert codec.read_header(codec.encode(kv)).lossless == "zstd"
    lossless = KVCodec(CodecConfig(quant="none"), FINGERPRINT)
    assert lossless.read_header(lossless.encode(torch.zeros(SHAPE))).lossless == "zstd"


@pytest.mark.parametrize("bad", [-0.1, 1.0, True, "0.1"])
def test_min_saving_is_validated(bad):
    with pytest.raises(ConfigError, match="min_saving"):
        CodecConfig(min_saving=bad)
