"""Packed symbols: two per byte where they fit in 4 bits, one per byte in planes where they do not.

Most symbols of an ``rms`` chunk lie in ``[-8, 7]``, and the lossless stage's Huffman decoder costs
about the same per byte whatever the byte holds, so storing two symbols per byte roughly halves
decompression, the data plane's slowest stage. The few symbols outside the range (outlier channels)
are *escapes*: their nibble is 0 and their true value is listed after the data. A plane quantized
with a fine step (the retrieval planes of a schedule fitted to answers) would escape a large share of
its symbols at 5 bytes each, so such a plane is stored one byte per symbol instead, chosen per chunk
and plane.

Token pairs: neighbouring tokens of one channel are alike, so the lossless stage's Huffman codes, which
see a byte as one letter, code such a pair ~3% (``balanced``) to 5% (the default) shorter than two
symbols half a chunk apart (docs/codec.md, "Token pairs and a block per plane").

The packed staging, after the scales (sizes and offsets: kvcache/layout.py)::

    table    u32 escape count | u8 flags (bit 0: key offsets, bit 1: token pairs) | u8 width per plane
             (0: 4 bits, 1: 8) | pad to 8
    data     each (layer, K/V) plane in order, 8-bit planes as int8 symbols, 4-bit planes as nibbles:
             with token pairs (chunks of an even token count), byte i * channels + c holds channel c
             of token 2i in its low nibble and of token 2i + 1 in its high one; without (the layout
             before session 18), byte j holds symbol j low and symbol j + plane/2 high
    pad to 4
    offsets  int8 [layers, channels] padded to 4 (flag bit 0): 4-bit key planes hold symbol - offset
    gaps     u32 [escapes]: each escape's flat symbol index minus the previous one's
    values   int8 [escapes]: the escaped symbols' true values
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from shadowserve.errors import ChunkFormatError
from shadowserve.kvcache.layout import TABLE_HEAD_NBYTES, Layout

# A plane is stored one byte per symbol when more than this share of its symbols would escape. Each
# escape costs 5 staging bytes and a scatter; a byte-wide plane costs half a byte per symbol more
# and a copy. Measured on SmolLM2 KV: docs/codec.md, "Per-plane symbol width".
WIDE_SHARE = 1 / 16
# Pack only if the packed symbols (table, data, offsets, escapes) take at most this share of the
# one-byte symbols. Unpacking costs the decoder time that inflating fewer bytes must win back: the
# default's chunks pack to 53% and decode faster; ``high``'s, with a third of their planes byte-wide,
# to 74% and decode slower than one byte per symbol (docs/codec.md, "Per-plane symbol width").
MAX_PACKED_SHARE = 0.7
_NIBBLE_MIN, _NIBBLE_MAX = -8, 7
_FLAG_KEY_OFFSETS = 1
_FLAG_TOKEN_PAIRS = 2
# Shift amounts as 0-dim tensors of the operands' dtypes: a Python int costs a conversion per call.
_FOUR_I8, _FOUR_U8 = torch.tensor(4, dtype=torch.int8), torch.tensor(4, dtype=torch.uint8)


@dataclass(frozen=True)
class Packing:
    """What a packed chunk's symbol table says."""

    escapes: int
    key_offsets: bool
    wide: tuple[bool, ...]  # per (layer, K/V) plane: one byte per symbol
    token_pairs: bool = False  # 4-bit planes pair tokens 2i and 2i + 1 of a channel in a byte

    def runs(self) -> tuple[tuple[int, int, bool], ...]:
        """Maximal runs of planes of one width: (first plane, end plane, wide)."""
        out, start = [], 0
        for p in range(1, len(self.wide) + 1):
            if p == len(self.wide) or self.wide[p] != self.wide[start]:
                out.append((start, p, self.wide[start]))
                start = p
        return tuple(out)


@dataclass(frozen=True)
class PackedSymbols:
    """A chunk's packed symbols, as views into its staging bytes."""

    data: torch.Tensor  # uint8: the planes' data, in plane order
    runs: tuple[tuple[int, int, bool], ...]  # Packing.runs()
    plane_nbytes: int  # symbols per (layer, K/V) plane
    positions: torch.Tensor  # int64 [escapes], ascending flat symbol indices
    values: torch.Tensor  # int8 [escapes]
    key_offsets: torch.Tensor | None  # int8 [layers, 1, channels]: added to every key symbol
    packing: Packing
    channels: int  # symbols per token row of a plane (token pairs unpack by rows)


def key_offsets_of(layout: Layout, sym: torch.Tensor) -> torch.Tensor:
    """Per-(layer, channel) key offsets for int8 symbols ``sym`` [N]: each key channel's median symbol.

    Keys have outlier channels whose values keep one sign and size across tokens, so their symbols
    sit far from 0 (escapes, and wide nibbles); stored relative to their channel's median, they are
    small. The decoded symbols are the same either way.
    """
    keys = sym.view(len(layout.rules), 2, layout.tokens, layout.channels)[:, 0]
    return keys.to(torch.int16).median(1, keepdim=True).values.to(torch.int8)  # [layers, 1, channels]


def pack_staging(layout: Layout, staging: np.ndarray, key_offsets: bool = False,
                 wide_share: float = WIDE_SHARE, max_share: float = MAX_PACKED_SHARE,
                 token_pairs: bool = True) -> np.ndarray | None:
    """The packed staging of a one-byte-per-symbol ``staging``; None unless its symbols take at most
    ``max_share`` of the one-byte symbols' bytes (and the staging is smaller, so the two layouts are
    told apart by size).

    ``key_offsets``: store the 4-bit key planes relative to their channel's median
    (``key_offsets_of``); byte-wide planes and escapes keep true symbol values. ``wide_share``: a
    plane whose escapes would exceed this share of its symbols is stored one byte per symbol.

    Encode path: allocates the new staging and temporaries of the chunk's size.
    """
    if key_offsets and not layout.offsets_packable:  # a chunk too small for the offsets' block
        key_offsets = False
    if not layout.packable:
        return None
    planes, pn = layout.planes, layout.plane_nbytes
    sym = torch.from_numpy(staging[layout.symbols_offset: layout.staging_nbytes]).view(torch.int8)
    rel = sym.view(planes, pn)
    offsets = None
    if key_offsets:
        offsets = key_offsets_of(layout, sym)
        rel4 = sym.to(torch.int16).view(len(layout.rules), 2, layout.tokens, layout.channels)
        rel4[:, 0] -= offsets  # in int16: a symbol minus its median may leave the int8 range
        rel = rel4.view(planes, pn)
    escaped = (rel < _NIBBLE_MIN) | (rel > _NIBBLE_MAX)
    wide = escaped.sum(1) > pn * wide_share
    escaped[wide] = False
    if offsets is not None:
        offsets[wide.view(-1, 2)[:, 0]] = 0  # byte-wide key planes hold true symbols
    positions = escaped.view(-1).nonzero().squeeze(1)
    k, nwide = positions.numel(), int(wide.sum())
    size = layout.packed_nbytes(k, key_offsets, nwide)
    too_big = size - layout.symbols_offset > max_share * layout.symbols_nbytes or size >= layout.staging_nbytes
    if k > layout.max_escapes or too_big:
        return pack_staging(layout, staging, False, wide_share=wide_share, max_share=max_share,
                            token_pairs=token_pairs) if key_offsets else None
    token_pairs = token_pairs and layout.tokens % 2 == 0
    out = np.zeros(size, dtype=np.uint8)
    out[: layout.scales_nbytes] = staging[: layout.scales_nbytes]
    t0 = layout.symbols_offset
    out[t0: t0 + 4] = np.array([k], "<u4").view(np.uint8)
    out[t0 + 4] = (_FLAG_KEY_OFFSETS if key_offsets else 0) | (_FLAG_TOKEN_PAIRS if token_pairs else 0)
    out[t0 + TABLE_HEAD_NBYTES: t0 + TABLE_HEAD_NBYTES + planes] = wide.numpy()
    nib = rel.masked_fill(escaped, 0).to(torch.int8).view(torch.uint8)
    if token_pairs:  # [planes, pairs, 2, channels]: low nibble token 2i, high nibble token 2i + 1
        nib = nib.view(planes, layout.tokens // 2, 2, layout.channels)
        nibbles = ((nib[:, :, 0] & 0x0F) | (nib[:, :, 1] << 4)).reshape(planes, pn // 2).numpy()
    else:
        nib = nib.view(planes, 2, pn // 2)
        nibbles = ((nib[:, 0] & 0x0F) | (nib[:, 1] << 4)).numpy()
    raw = sym.view(torch.uint8).view(planes, pn).numpy()
    pos = layout.data_offset
    for p in range(planes):
        row = raw[p] if wide[p] else nibbles[p]
        out[pos: pos + row.size] = row
        pos += row.size
    if key_offsets:
        o0 = layout.offsets_offset(nwide)
        out[o0: o0 + layout.num_offsets] = offsets.reshape(-1).view(torch.uint8).numpy()
    g0 = layout.escapes_offset(nwide, key_offsets)
    gaps = torch.diff(positions, prepend=positions.new_zeros(1)).to(torch.int32)
    out[g0: g0 + 4 * k] = gaps.numpy().astype("<u4").view(np.uint8)
    out[g0 + 4 * k: g0 + 5 * k] = sym[positions].numpy().view(np.uint8)
    return out


def plane_starts(layout: Layout, staging: np.ndarray) -> list[int]:
    """Where each (layer, K/V) plane's symbols start in a staging of either layout, then where the
    symbols end: the lossless stage's ``cuts``, since planes' symbol statistics differ (keys from
    values, fine planes from coarse ones). The encoder's; allocates a little."""
    nbytes = staging.nbytes
    packing = read_packing(layout, torch.from_numpy(staging), nbytes)
    if packing is None:
        return [layout.symbols_offset + p * layout.plane_nbytes for p in range(layout.planes + 1)]
    starts = [layout.data_offset]
    for wide in packing.wide:
        starts.append(starts[-1] + (layout.plane_nbytes if wide else layout.plane_nbytes // 2))
    return starts


def read_packing(layout: Layout, staging: torch.Tensor, staging_nbytes: int) -> Packing | None:
    """The symbol table of a staging of ``staging_nbytes`` bytes; None for one byte per symbol.

    Raises ChunkFormatError for a malformed table or a size that its table does not imply.
    """
    if staging_nbytes == layout.staging_nbytes:
        return None
    layout.check_staging_nbytes(staging_nbytes)
    t0 = layout.symbols_offset
    head = staging[t0: t0 + TABLE_HEAD_NBYTES + layout.planes]
    table = (head.cpu() if head.device.type != "cpu" else head).numpy().tobytes()
    k, flags, widths = int.from_bytes(table[:4], "little"), table[4], table[TABLE_HEAD_NBYTES:]
    if flags & ~(_FLAG_KEY_OFFSETS | _FLAG_TOKEN_PAIRS) or max(widths) > 1 or k > layout.max_escapes:
        raise ChunkFormatError("chunk's symbol table is malformed (flags, plane widths or escape count)")
    packing = Packing(k, bool(flags & _FLAG_KEY_OFFSETS), tuple(bool(w) for w in widths),
                      bool(flags & _FLAG_TOKEN_PAIRS))
    if packing.token_pairs and layout.tokens % 2:
        raise ChunkFormatError("chunk's symbol table is malformed (token pairs in a chunk of an odd token count)")
    if packing.key_offsets and not layout.offsets_packable:
        raise ChunkFormatError("chunk's symbol table is malformed (key offsets in a chunk too small for them)")
    expected = layout.packed_nbytes(k, packing.key_offsets, sum(packing.wide))
    if expected != staging_nbytes:
        raise ChunkFormatError(f"chunk claims {staging_nbytes} staging bytes, which no symbol layout of its "
                               f"shape has (its symbol table implies {expected})")
    return packing


def split_staging(layout: Layout, staging: torch.Tensor, staging_nbytes: int, check: bool = True,
                  packing: Packing | None = None) -> tuple[torch.Tensor, torch.Tensor | PackedSymbols]:
    """fp16 scales and the symbols (int8 [N], or PackedSymbols) held in a uint8 staging tensor.

    Works on any device; ``packing`` (read from a host copy of the same bytes) saves a device
    staging's table a round trip. ``check`` (host data) refuses escape positions outside the chunk,
    which a checksummed payload only has if its encoder was broken.
    """
    scales = staging[: layout.scales_nbytes].view(torch.float16)
    if staging_nbytes == layout.staging_nbytes:
        return scales, staging[layout.symbols_offset: layout.staging_nbytes].view(torch.int8)
    if packing is None:
        packing = read_packing(layout, staging, staging_nbytes)
    k, nwide = packing.escapes, sum(packing.wide)
    data = staging[layout.data_offset: layout.data_offset + layout.data_nbytes(nwide)]
    g0 = layout.escapes_offset(nwide, packing.key_offsets)
    key_offsets = None
    if packing.key_offsets:
        o0 = layout.offsets_offset(nwide)
        key_offsets = staging[o0: o0 + layout.num_offsets].view(torch.int8).view(len(layout.rules), 1, layout.channels)
    raw_gaps = staging[g0: g0 + 4 * k]
    if raw_gaps.storage_offset() % 4:  # a caller's buffer that starts off a 4-byte boundary
        raw_gaps = raw_gaps.clone()
    gaps = raw_gaps.view(torch.int32)
    positions = torch.cumsum(gaps, 0, dtype=torch.int64)
    if check and k and (int(gaps.min()) < 0 or int(positions[-1]) >= layout.symbols_nbytes):
        raise ChunkFormatError("chunk lists an escaped symbol outside its own symbols")
    values = staging[g0 + 4 * k: g0 + 5 * k].view(torch.int8)
    return scales, PackedSymbols(data, packing.runs(), layout.plane_nbytes, positions, values, key_offsets, packing,
                                 layout.channels)


def unpack_into(packed: PackedSymbols, out: torch.Tensor) -> None:
    """Write a chunk's packed symbols into int8 ``out`` [N], one per byte; any device.

    Three bit operations per run of 4-bit planes, a copy per run of byte-wide ones, then a scatter of
    the few escapes. Whole-run ops because on a small core each torch call's fixed cost, not memory
    bandwidth, is what adds up.
    """
    pn, half = packed.plane_nbytes, packed.plane_nbytes // 2
    if out.numel() != packed.runs[-1][1] * pn:
        raise ValueError(f"a chunk of {packed.runs[-1][1]} planes unpacks into {packed.runs[-1][1] * pn} "
                         f"symbols, not {out.numel()}")
    on_cpu = out.device.type == "cpu"
    four_i8, four_u8 = (_FOUR_I8, _FOUR_U8) if on_cpu else (4, 4)
    src_off = 0
    for p0, p1, wide in packed.runs:
        n = p1 - p0
        dst = out[p0 * pn: p1 * pn]
        if wide:
            dst.copy_(packed.data[src_off: src_off + n * pn].view(torch.int8))
            src_off += n * pn
            continue
        if packed.packing.token_pairs:  # [planes, pairs, channels] -> rows 2i (low) and 2i + 1 (high)
            c = packed.channels
            src = packed.data[src_off: src_off + n * half].view(n, half // c, c)
            d = dst.view(n, half // c, 2, c)
            low, high = d[:, :, 0], d[:, :, 1]
        else:
            src = packed.data[src_off: src_off + n * half].view(n, half)
            d = dst.view(n, 2, half)
            low, high = d[:, 0], d[:, 1]
        torch.bitwise_right_shift(src.view(torch.int8), four_i8, out=high)  # high nibble, sign-extended
        torch.bitwise_left_shift(src, four_u8, out=low.view(torch.uint8))
        low.bitwise_right_shift_(four_i8)  # low nibble: shifted up, then back down with its sign
        src_off += n * half
    if packed.key_offsets is not None:
        # Key symbols back from their channel's median. Escapes hold true values and are written
        # after; byte-wide key planes have offset 0; every other sum is its true value, an int8.
        layers, _, channels = packed.key_offsets.shape
        out.view(layers, 2, -1, channels)[:, 0].add_(packed.key_offsets)
    if packed.positions.numel():
        out.index_put_((packed.positions,), packed.values)
