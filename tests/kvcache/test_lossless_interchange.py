"""The lossless stage is a transport choice: chunks that differ only in it share keys, and any decoder
of their KV format reads them, whatever stage it would write with itself."""

import struct

import numpy as np
import pytest
import torch
import xxhash

from shadowserve.config import LOSSLESS_MODES, CodecConfig
from shadowserve.errors import ChunkFormatError
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
    codecs = {stage: KVCodec(CodecConfig(quant=quant, lossless=stage), FINGERPRINT) for stage in LOSSLESS_MODES}
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
    codec = KVCodec(CodecConfig(), FINGERPRINT)
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
    codec = KVCodec(CodecConfig(), FINGERPRINT)
    blob = codec.encode(make_kv())
    hlen = struct.unpack_from("<H", blob, 6)[0]
    head = bytes(blob[: hlen - 8]).replace(b"/zstd", b"/none")
    forged = head + struct.pack("<Q", xxhash.xxh3_64_intdigest(head)) + blob[hlen:]
    with pytest.raises(ChunkFormatError, match="expected"):
        _decode(codec, forged, torch.float32)
