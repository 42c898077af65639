"""Corrupt, truncated, mis-versioned and foreign chunks must raise ChunkFormatError, nothing else."""

import struct

import numpy as np
import pytest
import torch
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shadowserve.config import CodecConfig
from shadowserve.errors import ChunkFormatError, ShadowServeError
from shadowserve.kvcache import KVCodec
from shadowserve.kvcache import format as fmt
from tests.kvcache.conftest import FINGERPRINT, make_kv

SMALL = (2, 2, 8, 1, 8)
BLOCKED = (2, 2, 64, 2, 32)  # several 4 KiB lossless blocks (container version 3)
CODECS = [KVCodec(CodecConfig(), FINGERPRINT), KVCodec(CodecConfig(quant="cachegen", lossless="deflate"), FINGERPRINT),
          KVCodec(CodecConfig(quant="none", lossless="lz4"), FINGERPRINT),
          KVCodec(CodecConfig(quant="none", lossless="none"), FINGERPRINT),
          KVCodec(CodecConfig(lossless_block=4096), FINGERPRINT),
          KVCodec(CodecConfig(quant="cachegen", lossless="deflate", lossless_block=4096), FINGERPRINT),
          KVCodec(CodecConfig(quant="none", lossless="lz4", lossless_block=4096, min_saving=0), FINGERPRINT)]
SHAPES = [SMALL] * 4 + [BLOCKED] * 3
BLOBS = [c.encode(make_kv(shape, torch.float16, seed=i)) for i, (c, shape) in enumerate(zip(CODECS, SHAPES))]
BLOCKED_CASES = [i for i, blob in enumerate(BLOBS) if CODECS[i].read_header(blob).blocked]
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _decode(i, blob):
    codec, shape = CODECS[i], SHAPES[i]
    staging = np.zeros(codec.max_staging_nbytes(shape), np.uint8)
    out = torch.zeros(shape, dtype=torch.float16)
    header = codec.decompress_into(blob, staging)
    return codec.dequantize_into(header, staging, out)


def test_the_blocked_cases_are_blocked():
    assert BLOCKED_CASES == [4, 5, 6]
    assert all(len(CODECS[i].lossless_blocks(BLOBS[i])) >= 3 for i in BLOCKED_CASES)


def test_intact_chunks_decode():
    for i, blob in enumerate(BLOBS):
        _decode(i, blob)


@SETTINGS
@given(which=st.integers(0, len(CODECS) - 1), data=st.data())
def test_byte_flips_always_raise(which, data):
    blob = bytearray(BLOBS[which])
    flips = data.draw(st.lists(st.tuples(st.integers(0, len(blob) - 1), st.integers(1, 255)), min_size=1, max_size=4,
                                      unique_by=lambda flip: flip[0]))
    for pos, xor in flips:
        blob[pos] ^= xor
    with pytest.raises(ChunkFormatError):
        _decode(which, bytes(blob))


@SETTINGS
@given(which=st.integers(0, len(CODECS) - 1), data=st.data())
def test_truncations_and_extensions_raise(which, data):
    blob = BLOBS[which]
    cut = data.draw(st.integers(0, len(blob) - 1))
    with pytest.raises(ChunkFormatError):
        _decode(which, blob[:cut])
    tail = data.draw(st.binary(min_size=1, max_size=64))
    with pytest.raises(ChunkFormatError):
        _decode(which, blob + tail)


@SETTINGS
@given(junk=st.binary(max_size=512))
def test_random_bytes_raise(junk):
    with pytest.raises(ChunkFormatError):
        _decode(0, junk)


def _reseal(blob: bytes, patch) -> bytes:
    """Edit header fields and recompute the header checksum, as a buggy or foreign writer would."""
    hlen = struct.unpack_from("<H", blob, 6)[0]
    head = bytearray(blob[: hlen - 8])
    patch(head)
    return bytes(head) + struct.pack("<Q", xxhash.xxh3_64_intdigest(bytes(head))) + blob[hlen:]


def test_other_version_raises():
    blob = _reseal(BLOBS[0], lambda h: struct.pack_into("<H", h, 4, fmt.FORMAT_VERSION + 1))
    with pytest.raises(ChunkFormatError, match="version"):
        _decode(0, blob)


def test_foreign_model_raises():
    other = KVCodec(CodecConfig(), FINGERPRINT.replace("0123", "9999"))
    blob = other.encode(make_kv(SMALL, torch.float16))
    with pytest.raises(ChunkFormatError, match="model"):
        _decode(0, blob)


def test_other_codec_raises():
    with pytest.raises(ChunkFormatError, match="codec"):
        _decode(0, BLOBS[1])


def test_resealed_header_with_wrong_shape_raises():
    # Valid header checksum but a shape that does not fit the payload.
    blob = _reseal(BLOBS[0], lambda h: struct.pack_into("<I", h, 14, 9))
    with pytest.raises(ChunkFormatError):
        _decode(0, blob)


def _forge_payload(blob: bytes, payload: bytes) -> bytes:
    """``payload`` behind ``blob``'s header, with the payload length and both checksums made valid."""
    hlen = struct.unpack_from("<H", blob, 6)[0]
    off = struct.calcsize("<4sHHBBHHIHHI")

    def patch(h):
        struct.pack_into("<IQ", h, off, len(payload), xxhash.xxh3_64_intdigest(payload))

    return _reseal(blob[:hlen] + payload, patch)


@SETTINGS
@given(which=st.sampled_from(BLOCKED_CASES), data=st.data())
def test_forged_block_tables_raise_or_decode_the_same_kv(which, data):
    """Edits to a blocked chunk's table (and the padding after each block), with every checksum made
    valid again: the chunk is refused or, where only unread padding changed, decodes to the same KV.
    Never a crash, never other KV."""
    blob = BLOBS[which]
    hlen = struct.unpack_from("<H", blob, 6)[0]
    payload = bytearray(blob[hlen:])
    count = struct.unpack_from("<I", payload, 4)[0]
    table_end = 8 + 4 * count
    pads = [b.comp_offset - hlen + b.comp_nbytes for b in CODECS[which].lossless_blocks(blob)]
    targets = list(range(table_end)) + [p + k for p in pads for k in range(3) if p + k < len(payload)
                                        and (p + k) % 4]
    edits = data.draw(st.lists(st.tuples(st.sampled_from(targets), st.integers(1, 255)), min_size=1, max_size=4,
                               unique_by=lambda e: e[0]))
    for pos, xor in edits:
        payload[pos] ^= xor
    if data.draw(st.booleans()):  # sometimes also grow or shrink the payload past the table
        cut = data.draw(st.integers(-8, 8))
        payload = payload[:cut] if cut < 0 else payload + bytes(cut)
    try:
        decoded = _decode(which, _forge_payload(blob, bytes(payload)))
    except ChunkFormatError:
        return
    assert torch.equal(decoded, _decode(which, blob))


def test_resealed_payload_checksum_still_guards_inflate():
    # Corrupt payload with a matching payload checksum: the lossless stage itself must refuse it.
    for i in (0, 1, 2, *BLOCKED_CASES):
        blob = BLOBS[i]
        hlen = struct.unpack_from("<H", blob, 6)[0]
        payload = bytearray(blob[hlen:])
        payload[len(payload) // 2] ^= 0x5A
        payload = bytes(payload[: len(payload) - 3])
        off = struct.calcsize("<4sHHBBHHIHHI")

        def patch(h, payload=payload, off=off):
            struct.pack_into("<IQ", h, off, len(payload), xxhash.xxh3_64_intdigest(payload))

        forged = _reseal(blob[:hlen] + payload, patch)
        try:
            _decode(i, forged)
        except ChunkFormatError:
            pass  # ideal
        else:  # a stream that still inflates to exactly the right size is possible in principle
            pytest.fail("corrupted payload decoded without error")


def test_errors_are_shadowserve_errors():
    assert issubclass(ChunkFormatError, ShadowServeError)
