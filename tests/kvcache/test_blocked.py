"""Blocked lossless payloads (container version 3): the same KV and keys as one stream, every decoder
reads both, the block list is what a batched decoder needs, and a bad block table is refused."""

from __future__ import annotations

import dataclasses
import struct

import numpy as np
import pytest
import torch
import xxhash

from shadowserve.config import CodecConfig
from shadowserve.errors import ChunkFormatError, ConfigError
from shadowserve.kvcache import KVCodec, blocks
from shadowserve.kvcache import format as fmt
from shadowserve.kvcache.chunking import chunk_keys, key_seed
from shadowserve.kvcache.levels import QUALITY_LEVELS, quality_of
from shadowserve.kvcache.lossless import make_stage
from tests.kvcache.conftest import FINGERPRINT, make_kv

BIG = (4, 2, 64, 2, 32)  # staging of 16-130 KiB: several 4 KiB blocks whatever the quantizer
QUANTS = [CodecConfig(), CodecConfig(key_offsets=True), CodecConfig(quant="cachegen"),
          CodecConfig(quant="int8"), CodecConfig(quant="kivi"), CodecConfig(quant="uniform", bins=5),
          CodecConfig(quant="rms", pack_nibbles=False), CodecConfig(quant="none")]
STAGES = ["zstd", "deflate", "lz4"]


def _codec(config: CodecConfig, stage: str, block: int) -> KVCodec:
    # min_saving=0: every chunk keeps its stage (random fp32 bits would otherwise be stored raw).
    return KVCodec(dataclasses.replace(config, lossless=stage, lossless_block=block, min_saving=0), FINGERPRINT)


def _decode(codec: KVCodec, blob: bytes, shape=BIG, dtype=torch.float16) -> torch.Tensor:
    staging = np.zeros(codec.max_staging_nbytes(shape), np.uint8)
    header = codec.decompress_into(blob, staging)
    return codec.dequantize_into(header, staging, torch.empty(shape, dtype=dtype))


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("config", QUANTS, ids=lambda c: f"{c.quant}-{c.pack_nibbles}-{c.key_offsets}")
def test_blocked_and_one_stream_decode_to_the_same_kv_in_every_reader(config, stage):
    for dtype in (torch.float16, torch.float32):
        kv = make_kv(BIG, dtype, seed=3)
        codecs = [_codec(config, stage, block) for block in (0, 4096, 8192, 65536)]
        chunks = [c.encode(kv) for c in codecs]
        versions = [codecs[0].read_header(b).version for b in chunks]
        assert versions == [2, 3, 3, 3]
        reference = _decode(codecs[0], chunks[0], dtype=dtype)
        if config.quant == "none":
            assert torch.equal(reference, kv)
        for reader in codecs:
            for blob in chunks:
                assert torch.equal(_decode(reader, blob, dtype=dtype), reference)
                assert torch.equal(reader.decode(blob, torch.empty(BIG, dtype=dtype)), reference)
        assert all(len(b) <= c.max_encoded_nbytes(BIG) for b, c in zip(chunks, codecs))


def test_blocking_changes_neither_the_kv_format_id_nor_the_keys():
    tokens = list(range(2000, 2768))
    ids = set()
    keys = []
    for block in (0, 4096, 65536):
        codec = KVCodec(CodecConfig(lossless_block=block), FINGERPRINT)
        ids.add((codec.kv_format_id, codec.codec_id))
        keys.append(chunk_keys(tokens, 256, key_seed(FINGERPRINT, codec.kv_format_id)))
    assert ids == {("sskv4/rms:k0.5:v1", "sskv4/rms:k0.5:v1/zstd")}
    assert keys[0] == keys[1] == keys[2]
    blob = KVCodec(CodecConfig(lossless_block=4096), FINGERPRINT).encode(make_kv(BIG))
    assert KVCodec(CodecConfig(), FINGERPRINT).read_header(blob).codec_id == "sskv4/rms:k0.5:v1/zstd"
    for level, config in QUALITY_LEVELS.items():
        assert quality_of(dataclasses.replace(config, lossless_block=65536)) == level


def test_one_stream_chunks_are_version_2_as_before():
    codec = KVCodec(CodecConfig(), FINGERPRINT)
    blob = codec.encode(make_kv(BIG))
    header = codec.read_header(blob)
    assert header.version == fmt.UNBLOCKED_VERSION == 2 and not header.blocked
    assert header.header_nbytes == fmt.header_nbytes(codec.codec_id, FINGERPRINT, version=2)
    assert struct.unpack_from("<H", blob, 4)[0] == 2


@pytest.mark.parametrize("stage", STAGES)
def test_the_block_list_is_what_a_batched_decoder_needs(stage):
    codec = _codec(CodecConfig(), stage, 4096)
    blob = codec.encode(make_kv(BIG, seed=1))
    header = codec.read_header(blob)
    assert header.blocked and header.header_nbytes % 8 == 0  # the payload starts 8-byte aligned
    listed = codec.lossless_blocks(blob)
    assert len(listed) == -(-header.staging_nbytes // 4096) > 2
    raw_end = comp_end = 0
    for b in listed:
        assert b.comp_offset % 4 == 0 and b.comp_offset >= max(comp_end, header.header_nbytes)
        assert b.raw_offset == raw_end and 0 < b.raw_nbytes <= 4096
        raw_end, comp_end = b.raw_offset + b.raw_nbytes, b.comp_offset + b.comp_nbytes
    assert raw_end == header.staging_nbytes and comp_end <= len(blob)
    # Each block decoded alone (as a GPU batch would, in any order) rebuilds the staging bytes.
    reference = np.zeros(header.staging_nbytes, np.uint8)
    codec.decompress_into(blob, reference)
    rebuilt = np.zeros_like(reference)
    whole = np.frombuffer(blob, np.uint8)
    for b in reversed(listed):
        make_stage(stage).decompress_into(whole[b.comp_offset: b.comp_offset + b.comp_nbytes],
                                          rebuilt[b.raw_offset: b.raw_offset + b.raw_nbytes])
    assert np.array_equal(rebuilt, reference)


def test_a_one_stream_chunk_lists_one_block():
    codec = KVCodec(CodecConfig(), FINGERPRINT)
    blob = codec.encode(make_kv())
    header = codec.read_header(blob)
    assert codec.lossless_blocks(blob) == [blocks.Block(header.header_nbytes, header.payload_nbytes, 0,
                                                        header.staging_nbytes)]


def test_blocking_is_skipped_where_there_is_nothing_to_block():
    kv = make_kv(BIG, torch.float32)
    for config in (CodecConfig(quant="none", lossless="none", lossless_block=4096),  # no compressing stage
                   CodecConfig(quant="none", lossless="zstd", lossless_block=4096)):  # saves < min_saving
        codec = KVCodec(config, FINGERPRINT)
        header = codec.read_header(blob := codec.encode(kv))
        assert header.version == 2 and header.lossless == "none"
        assert torch.equal(_decode(codec, blob, dtype=torch.float32), kv)


@pytest.mark.parametrize("bad", [1, 1000, 4095, 6000, 65536 + 4096, 2**20, -4096, True, "64KiB"])
def test_lossless_block_is_validated(bad):
    with pytest.raises(ConfigError, match="lossless_block"):
        CodecConfig(lossless_block=bad)


def test_every_allowed_block_size_round_trips():
    kv = make_kv(BIG, torch.float32)
    reference = _decode(KVCodec(CodecConfig(quant="none", min_saving=0), FINGERPRINT), KVCodec(
        CodecConfig(quant="none", min_saving=0), FINGERPRINT).encode(kv), dtype=torch.float32)
    for block in range(4096, 65536 + 1, 4096):
        codec = _codec(CodecConfig(quant="none"), "lz4", block)
        assert torch.equal(_decode(codec, codec.encode(kv), dtype=torch.float32), reference)


# ---- malformed blocked chunks: checksums made valid again, as a buggy or hostile writer would -------

CODEC = _codec(CodecConfig(), "zstd", 4096)
BLOB = CODEC.encode(make_kv(BIG, seed=2))
HLEN = CODEC.read_header(BLOB).header_nbytes
STAGING = CODEC.read_header(BLOB).staging_nbytes
_PAYLOAD_FIELDS = struct.calcsize("<4sHHBBHHIHHI")  # offset of payload_len


def forge(payload: bytes, head: bytes | None = None) -> bytes:
    """``payload`` behind BLOB's header (or ``head``, header bytes before its checksum), all sums valid."""
    head = bytearray(BLOB[: HLEN - 8] if head is None else head)
    struct.pack_into("<IQ", head, _PAYLOAD_FIELDS, len(payload), xxhash.xxh3_64_intdigest(payload))
    return bytes(head) + struct.pack("<Q", xxhash.xxh3_64_intdigest(bytes(head))) + payload


def _table(payload: bytes) -> tuple[int, int, list[int]]:
    block, count = struct.unpack_from("<II", payload, 0)
    return block, count, list(struct.unpack_from(f"<{count}I", payload, 8))


def _with_table(payload: bytes, block: int, count: int, sizes: list[int], keep: int | None = None) -> bytes:
    old = 8 + 4 * _table(payload)[1]
    return struct.pack(f"<II{len(sizes)}I", block, count, *sizes) + payload[old if keep is None else keep:]


PAYLOAD = BLOB[HLEN:]
B, COUNT, SIZES = _table(PAYLOAD)


def test_the_forger_itself_makes_a_valid_chunk():
    assert torch.equal(_decode(CODEC, forge(PAYLOAD)), _decode(CODEC, BLOB))


def test_swapped_full_blocks_are_a_valid_other_payload():
    """Two full blocks swapped (sizes too) is a well-formed table over other staging bytes: like any
    re-encoded payload, only the payload checksum tells it from the original, and it does."""
    start, pad = 8 + 4 * COUNT, [-(-n // 4) * 4 for n in SIZES]
    body = PAYLOAD[start:]
    swapped = _with_table(PAYLOAD, B, COUNT, [SIZES[1], SIZES[0]] + SIZES[2:], keep=len(PAYLOAD)) \
        + body[pad[0]: pad[0] + pad[1]] + body[: pad[0]] + body[pad[0] + pad[1]:]
    with pytest.raises(ChunkFormatError, match="payload checksum"):
        _decode(CODEC, BLOB[:HLEN] + swapped)
    # Resealed, the payload inflates; the staging's own symbol table, which the first block held, then
    # refuses it (a forged one-stream payload meets the same check).
    with pytest.raises(ChunkFormatError, match="symbol table|no symbol layout"):
        _decode(CODEC, forge(swapped))


@pytest.mark.parametrize("case,payload", [
    ("block size over 64 KiB", _with_table(PAYLOAD, 65536 + 4096, COUNT, SIZES)),
    ("block size not a multiple of 4 KiB", _with_table(PAYLOAD, 4100, COUNT, SIZES)),
    ("block size 0", _with_table(PAYLOAD, 0, COUNT, SIZES)),
    ("other block size, same count", _with_table(PAYLOAD, 8192, COUNT, SIZES)),
    ("one block too few", _with_table(PAYLOAD, B, COUNT - 1, SIZES[:-1])),
    ("one block too many", _with_table(PAYLOAD, B, COUNT + 1, SIZES + [4])),
    ("count beyond the payload", struct.pack("<II", B, 2**31) + PAYLOAD[8:]),
    ("an empty block", _with_table(PAYLOAD, B, COUNT, [0] + SIZES[1:])),
    ("a block larger than any stage writes", _with_table(PAYLOAD, B, COUNT, [SIZES[0] + 8192] + SIZES[1:])),
    ("sizes that overrun the payload", _with_table(PAYLOAD, B, COUNT, [SIZES[0] + 4] + SIZES[1:])),
    ("sizes that leave bytes over", _with_table(PAYLOAD, B, COUNT, SIZES) + b"\0\0\0\0"),
    ("sizes moved between blocks", _with_table(PAYLOAD, B, COUNT, [SIZES[0] + 4, SIZES[1] - 4] + SIZES[2:])),
    ("first and last blocks swapped", None),
    ("a table cut short", PAYLOAD[:6]),
    ("no payload", b""),
])
def test_a_bad_block_table_is_refused(case, payload):
    if payload is None:  # the short last block where a full one belongs: it decodes to too few bytes
        assert STAGING % B, "the test chunk needs a short last block"
        start, pad = 8 + 4 * COUNT, [-(-n // 4) * 4 for n in SIZES]
        body = PAYLOAD[start:]
        first, middle, last = body[: pad[0]], body[pad[0]: sum(pad[:-1])], body[sum(pad[:-1]):]
        payload = _with_table(PAYLOAD, B, COUNT, [SIZES[-1]] + SIZES[1:-1] + [SIZES[0]], keep=len(PAYLOAD)) \
            + last + middle + first
    with pytest.raises(ChunkFormatError):
        _decode(CODEC, forge(payload))


def test_a_blocked_chunk_naming_no_stage_is_refused():
    head = BLOB[: HLEN - 8].replace(b"/zstd", b"/none")
    with pytest.raises(ChunkFormatError, match="blocked chunk"):
        _decode(CODEC, forge(PAYLOAD, head))


def test_header_padding_is_checked():
    head = bytearray(BLOB[: HLEN - 8])
    pad = HLEN - 8 - (fmt._FIXED.size + 4 + len(CODEC.codec_id) + len(FINGERPRINT))
    if pad:  # nonzero padding
        head[-1] = 1
        with pytest.raises(ChunkFormatError, match="header"):
            _decode(CODEC, forge(PAYLOAD, bytes(head)))
    # a version-2 header with version-3 padding, and a version-3 header without it
    v2 = KVCodec(CodecConfig(), FINGERPRINT).encode(make_kv(BIG, seed=2))
    v2_hlen = struct.unpack_from("<H", v2, 6)[0]
    for version, base, hlen in ((2, BLOB, HLEN), (3, v2, v2_hlen)):
        h = bytearray(base[: hlen - 8])
        struct.pack_into("<H", h, 4, version)
        if version == 3 and hlen % 8 == 0:
            continue  # this fingerprint needs no padding: nothing to get wrong
        sealed = bytes(h) + struct.pack("<Q", xxhash.xxh3_64_intdigest(bytes(h))) + base[hlen:]
        with pytest.raises(ChunkFormatError, match="header"):
            _decode(CODEC, sealed)
