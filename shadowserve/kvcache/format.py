"""The chunk container: a small self-describing header in front of the compressed payload.

Layout (all integers little-endian)::

    magic        4s   b"SSKV"
    version      u16  FORMAT_VERSION
    header_len   u16  bytes from the magic to the end of the header checksum
    dtype        u8   code of the KV dtype that was encoded (see DTYPE_CODES)
    reserved     u8   0
    layers       u16
    kv           u16  always 2 (K, V)
    tokens       u32
    kv_heads     u16
    head_dim     u16
    staging_len  u32  bytes after the lossless stage (quantized symbols + scales, or raw KV)
    payload_len  u32  bytes of payload after the header
    payload_sum  u64  xxh3_64 of the payload
    codec_len    u16, codec id (utf-8)   -- names the quantizer, its parameters and the lossless stage
    fp_len       u16, model fingerprint (utf-8)
    pad          version 3 only: 0-7 zero bytes, so that header_len is a multiple of 8
    header_sum   u64  xxh3_64 of every header byte before it

Two container versions are written and read. Version 2: the payload is one lossless stream of the
staging bytes. Version 3: the payload is independent blocks of at most 64 KiB of staging each, behind
a block table (kvcache/blocks.py), the layout GPU batched decompressors need; its header is padded so
that the payload, and with it every block, starts 8-byte aligned in the blob. The container version
does not change the decoded KV, so it is not the version in the KV format id (``KV_FORMAT_VERSION``).

A reader checks, in order: length, magic, version, header checksum, codec id, model fingerprint,
shape sanity, exact blob length, payload checksum. Any failure is a ``ChunkFormatError`` naming what
did not match, so a bad chunk is never decoded into KV. The 64-bit checksums make an undetected
random corruption vanishingly unlikely (about 2**-64).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import xxhash

from shadowserve.errors import ChunkFormatError
from shadowserve.kvcache.lossless import LOSSLESS_STAGES

MAGIC = b"SSKV"
FORMAT_VERSION = 3  # the newest container: 3 = blocked lossless payload (kvcache/blocks.py)
UNBLOCKED_VERSION = 2  # one lossless stream per chunk; still written when blocking is off
READ_VERSIONS = (UNBLOCKED_VERSION, FORMAT_VERSION)
# The version in the KV format id (``sskv3/...``), which seeds chunk keys: the staging layouts and
# what they decode to (2: lossy symbols may be stored two per byte; 3: a packed chunk starts with a
# symbol table and stores each plane 4 or 8 bits wide, kvcache/packing.py; 4: nibbles pair neighbouring
# tokens, flagged in the table, so a build of this version still reads version-3 stagings while a
# version-3 build, which would refuse the flag, never looks such a chunk up). Blocking the payload
# changes neither, so chunks of either container version share keys.
KV_FORMAT_VERSION = 4
# Raw chunks (``quant="none"``) stage the KV itself, a layout unchanged since version 2: their keys stay,
# so lossless caches survive the upgrade.
RAW_KV_FORMAT_VERSION = 2
_PAD_TO = 8  # a version-3 header's length is a multiple of this

DTYPE_CODES: dict[torch.dtype, int] = {torch.float32: 1, torch.float16: 2, torch.bfloat16: 3}
CODE_DTYPES: dict[int, torch.dtype] = {v: k for k, v in DTYPE_CODES.items()}

_FIXED = struct.Struct("<4sHHBBHHIHHIIQ")  # up to and including payload_sum
_U16 = struct.Struct("<H")
_U64 = struct.Struct("<Q")
MAX_TEXT = 1024  # longest codec id / fingerprint we accept


@dataclass(frozen=True)
class ChunkHeader:
    """What a verified container says about its chunk; returned by ``KVCodec.decompress_into``."""

    shape: tuple[int, int, int, int, int]  # [layers, 2, tokens, kv_heads, head_dim]
    dtype: torch.dtype
    codec_id: str
    model_fingerprint: str
    staging_nbytes: int
    payload_nbytes: int
    header_nbytes: int
    version: int = UNBLOCKED_VERSION

    @property
    def blocked(self) -> bool:
        """True when the payload is independent blocks behind a block table (version 3)."""
        return self.version == FORMAT_VERSION

    @property
    def lossless(self) -> str:
        """The lossless stage the payload went through (the codec id's last part)."""
        return self.codec_id.rpartition("/")[2]


def header_nbytes(codec_id: str, model_fingerprint: str, version: int = FORMAT_VERSION) -> int:
    """Size of the header for this codec id, fingerprint and version (it does not depend on the chunk)."""
    n = _FIXED.size + 2 + len(codec_id.encode()) + 2 + len(model_fingerprint.encode())
    if version == FORMAT_VERSION:
        n = -(-n // _PAD_TO) * _PAD_TO
    return n + 8


def pack(shape: tuple[int, ...], dtype: torch.dtype, codec_id: str, model_fingerprint: str,
         staging_nbytes: int, payload: Any, blocked: bool = False) -> bytes:
    """Build a complete chunk: header followed by ``payload`` (the lossless stage's output; with
    ``blocked``, a blocked payload from kvcache/blocks.py, in a version-3 container)."""
    if dtype not in DTYPE_CODES:
        raise ChunkFormatError(f"cannot store KV of dtype {dtype}")
    if len(shape) != 5 or shape[1] != 2:
        raise ChunkFormatError(f"KV shape must be [layers, 2, tokens, kv_heads, head_dim], got {list(shape)}")
    cid, fp = codec_id.encode(), model_fingerprint.encode()
    if len(cid) > MAX_TEXT or len(fp) > MAX_TEXT:
        raise ChunkFormatError("codec id or model fingerprint is too long for the chunk header")
    payload = memoryview(payload).cast("B")
    version = FORMAT_VERSION if blocked else UNBLOCKED_VERSION
    hlen = header_nbytes(codec_id, model_fingerprint, version)
    layers, _, tokens, heads, head_dim = shape
    fixed = _FIXED.pack(MAGIC, version, hlen, DTYPE_CODES[dtype], 0, layers, 2, tokens, heads,
                        head_dim, staging_nbytes, payload.nbytes, xxhash.xxh3_64_intdigest(payload))
    head = b"".join([fixed, _U16.pack(len(cid)), cid, _U16.pack(len(fp)), fp])
    head += bytes(hlen - 8 - len(head))  # version 3: zeros up to a multiple of 8
    return b"".join([head, _U64.pack(xxhash.xxh3_64_intdigest(head)), payload])


def parse(blob: Any, expect_kv_format: str, expect_fingerprint: str) -> tuple[ChunkHeader, np.ndarray]:
    """Verify a chunk and return its header and a zero-copy view of its payload.

    ``expect_kv_format`` is the codec id without its lossless stage (``KVCodec.kv_format_id``): a chunk
    of that KV format passes whichever known lossless stage it went through. Raises ChunkFormatError
    on anything unexpected: truncation, bad magic, unknown version, corrupted header or payload,
    another KV format, an unknown lossless stage, another model.
    """
    try:
        buf = np.frombuffer(blob, dtype=np.uint8) if not isinstance(blob, np.ndarray) else blob.reshape(-1).view(np.uint8)
    except (TypeError, ValueError) as exc:
        raise ChunkFormatError(f"chunk is not a contiguous byte buffer: {exc}") from None
    n = buf.nbytes
    if n < _FIXED.size + 12:
        raise ChunkFormatError(f"chunk is truncated: {n} bytes is shorter than any header")
    mv = memoryview(buf)
    (magic, version, hlen, dcode, _reserved, layers, kv, tokens, heads, head_dim, staging_len,
     payload_len, payload_sum) = _FIXED.unpack_from(mv, 0)
    if magic != MAGIC:
        raise ChunkFormatError(f"not a ShadowServe KV chunk (magic {bytes(magic)!r}, expected {MAGIC!r})")
    if version not in READ_VERSIONS:
        raise ChunkFormatError(f"unsupported chunk format version {version} "
                               f"(this build reads {', '.join(map(str, READ_VERSIONS))})")
    if hlen > n or hlen < _FIXED.size + 12:
        raise ChunkFormatError(f"chunk is truncated or corrupt: header claims {hlen} bytes, chunk has {n}")
    (stored_sum,) = _U64.unpack_from(mv, hlen - 8)
    if xxhash.xxh3_64_intdigest(mv[: hlen - 8]) != stored_sum:
        raise ChunkFormatError("chunk header checksum mismatch: the header is corrupt")
    off = _FIXED.size
    (clen,) = _U16.unpack_from(mv, off)
    off += 2
    codec_id = bytes(mv[off: off + clen]).decode("utf-8", "replace")
    off += clen
    (flen,) = _U16.unpack_from(mv, off)
    off += 2
    fingerprint = bytes(mv[off: off + flen]).decode("utf-8", "replace")
    off += flen
    pad = hlen - 8 - off
    if version == FORMAT_VERSION:
        if not 0 <= pad < _PAD_TO or hlen % _PAD_TO or any(mv[off: off + pad]):
            raise ChunkFormatError("chunk header lengths are inconsistent")
    elif pad != 0:
        raise ChunkFormatError("chunk header lengths are inconsistent")
    kv_format, _, lossless = codec_id.rpartition("/")
    if kv_format != expect_kv_format:
        raise ChunkFormatError(f"chunk was encoded with codec {codec_id!r}, this decoder reads {expect_kv_format!r}/*")
    if lossless not in LOSSLESS_STAGES:
        raise ChunkFormatError(f"chunk names an unknown lossless stage {lossless!r} (codec {codec_id!r})")
    if version == FORMAT_VERSION and lossless == "none":
        raise ChunkFormatError("a blocked chunk must name a compressing lossless stage, not 'none'")
    if fingerprint != expect_fingerprint:
        raise ChunkFormatError(
            f"chunk belongs to model {fingerprint!r}, expected {expect_fingerprint!r}: refusing foreign KV")
    if dcode not in CODE_DTYPES:
        raise ChunkFormatError(f"chunk has unknown dtype code {dcode}")
    if kv != 2 or min(layers, tokens, heads, head_dim) < 1:
        raise ChunkFormatError(f"chunk has an invalid KV shape {[layers, kv, tokens, heads, head_dim]}")
    if hlen + payload_len != n:
        raise ChunkFormatError(
            f"chunk length mismatch: header + payload should be {hlen + payload_len} bytes, got {n} "
            f"({'truncated' if n < hlen + payload_len else 'trailing bytes'})")
    payload = buf[hlen:]
    if xxhash.xxh3_64_intdigest(memoryview(payload)) != payload_sum:
        raise ChunkFormatError("chunk payload checksum mismatch: the payload is corrupt")
    header = ChunkHeader(shape=(layers, 2, tokens, heads, head_dim), dtype=CODE_DTYPES[dcode],
                         codec_id=codec_id, model_fingerprint=fingerprint, staging_nbytes=staging_len,
                         payload_nbytes=payload_len, header_nbytes=hlen, version=version)
    return header, payload
