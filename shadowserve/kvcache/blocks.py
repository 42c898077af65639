"""Blocked lossless payloads (container version 3): a chunk's staging bytes as independent blocks.

Why: a GPU batched decompressor (nvCOMP's Deflate, zstd and LZ4 decoders) parallelizes across
independent streams, not within one, so a chunk that is one 1.5-16 MiB stream decodes serially on
the GPU (2.05 s for a 16 MiB Deflate chunk, docs/results-gpu.md). Cut into blocks of at most 64 KiB
of staging each, compressed independently with the chunk's lossless stage, a chunk is dozens of
streams that the batched decoder takes in one call; nvCOMP's Deflate decoder needs blocks of at most
64 KiB (uncompressed) and every compressed block at a 4-byte aligned address. The CPU decodes the
same blocks one after the other into their slices of the staging buffer.

Payload layout (integers little-endian u32)::

    block_nbytes   staging bytes per block; every block holds that many but the last (the rest)
    count          number of blocks: ceil(staging_len / block_nbytes)
    sizes          count x u32: compressed bytes of each block
    blocks         each block's compressed bytes, zero-padded to a multiple of 4

Block ``i`` starts at payload offset ``8 + 4 * count + sum(round_up_4(sizes[j]) for j < i)``, so every
start is 4-byte aligned by construction (and 8-byte aligned in the blob when the payload is: the
version-3 header is padded to a multiple of 8). Offsets are derived, not stored, so a table cannot
describe overlapping or out-of-order blocks; what it can get wrong (a block size outside the limits,
a count that does not cover the staging bytes, an empty or oversized block, sizes that do not add up
to the payload) is a ``ChunkFormatError``. Each block is compressed, never stored raw: every stage
already stores incompressible input with a few bytes of framing, and a chunk whose stage saves too
little is stored whole as ``none`` (``min_saving``), so a per-block raw flag would add a case for
nothing. Padding is written as zeros and never read.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from shadowserve.config import LOSSLESS_BLOCK_MAX, LOSSLESS_BLOCK_STEP, is_lossless_block
from shadowserve.errors import ChunkFormatError
from shadowserve.kvcache.lossless import LosslessStage

ALIGN = 4  # every compressed block starts at a multiple of this in the payload
MIN_BLOCK_NBYTES = LOSSLESS_BLOCK_STEP  # block sizes are whole multiples of it
MAX_BLOCK_NBYTES = LOSSLESS_BLOCK_MAX  # nvCOMP's batched Deflate decoder takes blocks of at most 64 KiB
_HEAD = struct.Struct("<II")
# A compressed block of n staging bytes is never larger than n + n/128 + this: every stage's worst case
# on incompressible input (deflate: 5 bytes per stored block; zstd: a frame and block header; lz4:
# n/255 + 16) stays below it. A table claiming more is corrupt.
_BLOCK_SLACK = 64


def _max_block(raw_nbytes: int) -> int:
    return raw_nbytes + raw_nbytes // 128 + _BLOCK_SLACK


class Block(NamedTuple):
    """Where one independent block sits: what a GPU batched decoder's input and output arrays hold."""

    comp_offset: int  # first compressed byte (from the start of the payload, or of the blob in ``KVCodec.lossless_blocks``)
    comp_nbytes: int
    raw_offset: int  # first staging byte it decodes to
    raw_nbytes: int


def check_block_nbytes(block_nbytes: int) -> None:
    """Raise ValueError unless ``block_nbytes`` is a block size the format allows."""
    if not is_lossless_block(block_nbytes):
        raise ValueError(f"a lossless block must be a multiple of {MIN_BLOCK_NBYTES} bytes up to "
                         f"{MAX_BLOCK_NBYTES}, got {block_nbytes!r}")


def max_overhead_nbytes(staging_nbytes: int) -> int:
    """Most bytes blocking can add to a payload of ``staging_nbytes`` (any allowed block size): the
    table, padding and each block's own framing, for receive buffers sized before the chunk is seen."""
    count = math.ceil(staging_nbytes / MIN_BLOCK_NBYTES)
    return _HEAD.size + staging_nbytes // 128 + count * (4 + ALIGN - 1 + _BLOCK_SLACK + 1)


def compress(stage: LosslessStage, staging: np.ndarray, block_nbytes: int, cuts: Sequence[int] = ()) -> bytes:
    """The blocked payload of ``staging`` (flat uint8): each block compressed alone by ``stage``, with
    the ``cuts`` (``LosslessStage.compress``) that fall inside it."""
    check_block_nbytes(block_nbytes)
    n = staging.nbytes
    count = max(1, math.ceil(n / block_nbytes))
    parts = []
    for i in range(count):
        lo, hi = i * block_nbytes, min(n, (i + 1) * block_nbytes)
        parts.append(stage.compress(staging[lo:hi], [c - lo for c in cuts if lo < c < hi]))
    out = [_HEAD.pack(block_nbytes, count), struct.pack(f"<{count}I", *(len(p) for p in parts))]
    for p in parts:
        out.append(p)
        if len(p) % ALIGN:
            out.append(bytes(ALIGN - len(p) % ALIGN))
    return b"".join(out)


def table(payload: np.ndarray, staging_nbytes: int) -> list[Block]:
    """Verify a blocked payload's table against its length and the chunk's staging size; return its
    blocks (offsets from the start of the payload). Raises ChunkFormatError on any inconsistency."""
    n = payload.nbytes
    if n < _HEAD.size:
        raise ChunkFormatError(f"blocked payload is {n} bytes, shorter than its block table")
    block_nbytes, count = _HEAD.unpack_from(payload, 0)
    try:
        check_block_nbytes(block_nbytes)
    except ValueError as exc:
        raise ChunkFormatError(f"blocked payload: {exc}") from None
    if staging_nbytes < 1 or count != math.ceil(staging_nbytes / block_nbytes):
        raise ChunkFormatError(f"blocked payload has {count} blocks of {block_nbytes} bytes, "
                               f"its {staging_nbytes} staging bytes need {math.ceil(staging_nbytes / block_nbytes)}")
    start = _HEAD.size + 4 * count
    if start > n:
        raise ChunkFormatError(f"blocked payload is {n} bytes, its table alone needs {start}")
    sizes = payload[_HEAD.size: start].view("<u4").tolist()
    limit = _max_block(block_nbytes)
    blocks, off = [], start
    for i, size in enumerate(sizes):
        if not 0 < size <= limit:
            raise ChunkFormatError(f"blocked payload: block {i} claims {size} compressed bytes (1 to {limit} allowed)")
        raw = i * block_nbytes
        blocks.append(Block(off, size, raw, min(block_nbytes, staging_nbytes - raw)))
        off += -(-size // ALIGN) * ALIGN
    if off != n:
        raise ChunkFormatError(f"blocked payload's blocks add up to {off} bytes, the payload is {n}")
    return blocks


def decompress_into(stage: LosslessStage, payload: np.ndarray, dst: np.ndarray) -> None:
    """Hot path: verify the table, then decode every block into its slice of ``dst`` (exactly the
    chunk's staging bytes); zero-copy, one native call per block with the GIL released."""
    stage.decompress_blocks_into(payload, dst, table(payload, dst.nbytes))
