"""Symmetric scalar quantization of KV chunks: one int8 symbol per value plus fp16 scales.

Every (layer, K/V) plane of a chunk is quantized as ``q = round(x / s)`` with a scale ``s`` per
token (a row of kv_heads*head_dim channels) or, for KIVI-style keys, per channel. The reconstruction
``q * s`` is off by at most ``s / 2`` per value (plus the rounding of the output dtype): scales are
stored in fp16 and rounded *up* before use, so clipping never happens and the bound is exact.

How ``s`` is chosen is the only difference between the modes:

* ``absmax`` rules (CacheGen, uniform, int8, KIVI): ``s = max|x| / h`` with ``2h+1`` levels.
* ``rms`` rule (our default): ``s = step * rms(x_row)``, an entropy-constrained quantizer. The
  symbol range is left open (up to +-127) and the lossless stage pays only for the levels that
  occur; outliers no longer coarsen every other channel of their token.

Symbols sit in [layers, 2, tokens, channels] order, in one of two staging layouts:

* one int8 per symbol (always possible);
* **two per byte** when a chunk's symbols almost all fit in 4 bits (``[-8, 7]``), the usual case
  for ``rms`` and every <= 16-bin mode. Byte ``j`` of a (layer, K/V) plane holds the plane's symbol
  ``j`` in its low nibble and symbol ``j + plane/2`` in its high one, so unpacking writes two
  contiguous halves. Symbols outside ``[-8, 7]`` (outlier channels) are *escapes*: their nibble is
  0 and their true value is listed after the nibbles, with its position. The lossless stage's
  Huffman decoder costs about the same per byte whatever the byte holds, so halving the bytes
  roughly halves decompression, the data plane's slowest stage (docs/codec.md).

The staging size tells the layouts apart (``Layout.escapes_in``): the packed one is always smaller.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import torch

from shadowserve.errors import ChunkFormatError
from shadowserve.kvcache.plan import TOKEN, PlaneRule

_FP16_MAX = 65504.0
_FP16_TINY = 2.0**-24  # smallest positive fp16 (subnormal): keeps all-zero rows divisible
_BLOCK_ELEMS = 512 * 1024  # fp32 scratch per dequantize step (2 MiB): measured best on this machine
_NIBBLE_MIN, _NIBBLE_MAX = -8, 7  # what a 4-bit two's-complement nibble holds
_ESCAPE_NBYTES = 5  # uint32 gap to the previous escape + the int8 value
_MAX_ESCAPE_SHARE = 32  # pack only if at most 1/32 of the symbols escape (the default rms: ~1/160)
# Shift amounts as 0-dim tensors of the operands' dtypes: a Python int costs a conversion per call.
_FOUR_I8, _FOUR_U8 = torch.tensor(4, dtype=torch.int8), torch.tensor(4, dtype=torch.uint8)


class Layout:
    """Where each plane's scales live in the staging buffer, for one chunk shape and plan."""

    def __init__(self, rules: list[tuple[PlaneRule, PlaneRule]], tokens: int, channels: int) -> None:
        self.rules = rules
        self.tokens, self.channels = tokens, channels
        self.token_only = all(r.axis == TOKEN for pair in rules for r in pair)
        self.offsets: list[tuple[int, int]] = []  # (offset, length) in scale elements, per (layer, kv)
        off = 0
        for pair in rules:
            for r in pair:
                n = tokens if r.axis == TOKEN else channels
                self.offsets.append((off, n))
                off += n
        self.num_scales = off
        self.scales_nbytes = 2 * off
        self.symbols_offset = (self.scales_nbytes + 63) // 64 * 64  # keep symbols cache-line aligned
        self.symbols_nbytes = len(rules) * 2 * tokens * channels
        self.staging_nbytes = self.symbols_offset + self.symbols_nbytes  # one byte per symbol: the most a chunk needs
        # Two symbols per byte: nibbles, then escape gaps (uint32, 4-byte aligned), then escape values (int8).
        self.plane_nbytes = tokens * channels
        self.nibbles_nbytes = self.symbols_nbytes // 2
        self.escapes_offset = (self.symbols_offset + self.nibbles_nbytes + 3) // 4 * 4
        self.max_escapes = self.symbols_nbytes // _MAX_ESCAPE_SHARE
        # Packed sizes must never reach the one-byte size, or the two layouts could not be told apart.
        self.packable = self.plane_nbytes % 2 == 0 and self.packed_nbytes(self.max_escapes) < self.staging_nbytes
        # Key offsets (int8, one per (layer, key channel)) sit where the escapes would start, padded to
        # a multiple of 4 bytes (the gaps stay aligned) that is not a multiple of 5 bytes (an escape's
        # size), so a staging size says which packed layout it is: sizes with and without offsets differ
        # by offsets_nbytes + 5 * (a whole number of escapes), which is never 0.
        self.num_offsets = len(rules) * channels
        d = (self.num_offsets + 3) // 4 * 4
        self.offsets_nbytes = d + 4 if d % 5 == 0 else d
        self.offsets_packable = self.packable and \
            self.packed_nbytes(self.max_escapes, offsets=True) < self.staging_nbytes

    def packed_nbytes(self, escapes: int, offsets: bool = False) -> int:
        """Staging size of a two-symbols-per-byte chunk with ``escapes`` out-of-range symbols
        (and, with ``offsets``, per-channel key offsets)."""
        return self.escapes_offset + (self.offsets_nbytes if offsets else 0) + _ESCAPE_NBYTES * escapes

    def packing_of(self, staging_nbytes: int) -> tuple[int, bool] | None:
        """(escapes, has key offsets) of a packed staging of this size; None for one byte per symbol.

        Raises ChunkFormatError for a size that no layout can have.
        """
        if staging_nbytes == self.staging_nbytes:
            return None
        extra = staging_nbytes - self.escapes_offset
        if self.packable and extra >= 0 and extra % _ESCAPE_NBYTES == 0 and extra // _ESCAPE_NBYTES <= self.max_escapes:
            return extra // _ESCAPE_NBYTES, False
        extra -= self.offsets_nbytes
        if self.offsets_packable and extra >= 0 and extra % _ESCAPE_NBYTES == 0 \
                and extra // _ESCAPE_NBYTES <= self.max_escapes:
            return extra // _ESCAPE_NBYTES, True
        raise ChunkFormatError(
            f"chunk claims {staging_nbytes} staging bytes, which no symbol layout of its shape has "
            f"(one byte per symbol: {self.staging_nbytes})")

    def escapes_in(self, staging_nbytes: int) -> int | None:
        """Escapes held by a packed staging of this size; None for the one-byte-per-symbol layout.

        Raises ChunkFormatError for a size that no layout can have.
        """
        packing = self.packing_of(staging_nbytes)
        return None if packing is None else packing[0]

    def scale_view(self, scales: torch.Tensor, layer: int, kv: int) -> torch.Tensor:
        """One plane's scales shaped to broadcast over [tokens, channels]."""
        off, n = self.offsets[layer * 2 + kv]
        s = scales[off: off + n]
        return s.view(n, 1) if self.rules[layer][kv].axis == TOKEN else s.view(1, n)


def _round_up_fp16(s: torch.Tensor) -> torch.Tensor:
    """fp16 scales that are >= the fp32 ones, so ``|x| / s16 <= h`` still holds (no clipping)."""
    s = s.clamp_min(_FP16_TINY)
    if not bool(torch.isfinite(s).all()) or float(s.max()) > _FP16_MAX:
        raise ChunkFormatError("cannot quantize KV with non-finite or huge values (|x| beyond fp16 scale range)")
    s16 = s.to(torch.float16)
    low = s16.float() < s
    if bool(low.any()):
        s16[low] = torch.nextafter(s16[low], torch.full_like(s16[low], float("inf")))
    return s16


def _plane_scales(x: torch.Tensor, rule: PlaneRule) -> torch.Tensor:
    """fp32 scales for a [tokens, channels] plane (before fp16 rounding)."""
    dim = 1 if rule.axis == TOKEN else 0
    amax = x.abs().amax(dim)
    if rule.kind == "absmax":
        return amax / rule.param
    rms = x.square().mean(dim).sqrt()
    return torch.maximum(rms * rule.param, amax / 127.0)


def quantize(x: torch.Tensor, layout: Layout, scales_out: torch.Tensor, symbols_out: torch.Tensor) -> None:
    """Quantize fp32 KV ``x`` [layers, 2, tokens, channels] into fp16 ``scales_out`` and int8 ``symbols_out``.

    Encode path (the save side); it allocates temporaries of the chunk's size.
    """
    layers = len(layout.rules)
    if layout.token_only:
        # All planes scale per token: do every layer at once.
        amax = x.abs().amax(-1)  # [L, 2, T]
        kind = [[r.kind for r in pair] for pair in layout.rules]
        param = torch.tensor([[r.param for r in pair] for pair in layout.rules], dtype=torch.float32)[..., None]
        is_rms = torch.tensor([[k == "rms" for k in pair] for pair in kind])[..., None]
        s = amax / torch.where(is_rms, torch.full_like(param, 127.0), param)
        if bool(is_rms.any()):
            rms = x.square().mean(-1).sqrt()
            s = torch.where(is_rms, torch.maximum(rms * param, s), s)
        s16 = _round_up_fp16(s)
        scales_out.copy_(s16.reshape(-1))
        hmax = torch.tensor([[r.max_level for r in pair] for pair in layout.rules], dtype=torch.float32)
        q = torch.div(x, s16.float()[..., None]).round_()
        q = torch.minimum(torch.maximum(q, -hmax[..., None, None]), hmax[..., None, None])
        symbols_out.copy_(q.reshape(symbols_out.shape))
        return
    sym = symbols_out.view(layers, 2, layout.tokens, layout.channels)
    for layer in range(layers):
        for kv in range(2):
            rule = layout.rules[layer][kv]
            plane = x[layer, kv]
            s16 = _round_up_fp16(_plane_scales(plane, rule))
            off, n = layout.offsets[layer * 2 + kv]
            scales_out[off: off + n].copy_(s16)
            view = layout.scale_view(scales_out, layer, kv).float()
            h = rule.max_level
            sym[layer, kv].copy_(torch.div(plane, view).round_().clamp_(-h, h))


@dataclass(frozen=True)
class PackedSymbols:
    """A chunk's symbols two per byte (see the module docstring), as views into its staging bytes."""

    nibbles: torch.Tensor  # uint8 [symbols / 2]
    positions: torch.Tensor  # int64 [escapes], ascending flat symbol indices
    values: torch.Tensor  # int8 [escapes]
    half_plane: int  # bytes per (layer, K/V) plane: its symbols j and j + half_plane share byte j
    key_offsets: torch.Tensor | None = None  # int8 [layers, 1, channels]: added to every key symbol


def key_offsets_of(layout: Layout, sym: torch.Tensor) -> torch.Tensor:
    """Per-(layer, channel) key offsets for int8 symbols ``sym`` [N]: each key channel's median symbol.

    Keys have outlier channels whose values keep one sign and size across tokens, so their symbols
    sit far from 0 (escapes, and wide nibbles); stored relative to their channel's median, they are
    small. The decoded symbols are the same either way.
    """
    layers = len(layout.rules)
    keys = sym.view(layers, 2, layout.tokens, layout.channels)[:, 0]
    return keys.to(torch.int16).median(1, keepdim=True).values.to(torch.int8)  # [layers, 1, channels]


def pack_staging(layout: Layout, staging: np.ndarray, key_offsets: bool = False) -> np.ndarray | None:
    """The two-per-byte staging of a one-byte-per-symbol ``staging``; None if it does not pay.

    ``key_offsets``: store key symbols relative to their channel's median (``key_offsets_of``),
    with the medians after the nibbles. Escapes keep their true symbol value.

    Encode path: allocates the new staging and temporaries of the chunk's size.
    """
    if key_offsets and not layout.offsets_packable:  # a chunk too small for the offsets' block
        key_offsets = False
    if not layout.packable:
        return None
    sym = torch.from_numpy(staging[layout.symbols_offset: layout.staging_nbytes]).view(torch.int8)
    rel = sym
    if key_offsets:
        offsets = key_offsets_of(layout, sym)
        rel = sym.to(torch.int16).view(len(layout.rules), 2, layout.tokens, layout.channels)
        rel[:, 0] -= offsets  # in int16: a symbol minus its median may leave the int8 range
        rel = rel.view(-1)
    escaped = (rel < _NIBBLE_MIN) | (rel > _NIBBLE_MAX)
    positions = escaped.nonzero().squeeze(1)
    k = positions.numel()
    if k > layout.max_escapes:
        return pack_staging(layout, staging) if key_offsets else None
    out = np.zeros(layout.packed_nbytes(k, key_offsets), dtype=np.uint8)
    out[: layout.scales_nbytes] = staging[: layout.scales_nbytes]
    nib = rel.masked_fill(escaped, 0).to(torch.int8).view(torch.uint8).view(-1, 2, layout.plane_nbytes // 2)
    packed = (nib[:, 0] & 0x0F) | (nib[:, 1] << 4)
    out[layout.symbols_offset: layout.symbols_offset + layout.nibbles_nbytes] = packed.reshape(-1).numpy()
    gaps = torch.diff(positions, prepend=positions.new_zeros(1)).to(torch.int32)
    g0 = layout.escapes_offset
    if key_offsets:
        out[g0: g0 + layout.num_offsets] = offsets.reshape(-1).view(torch.uint8).numpy()
        g0 += layout.offsets_nbytes
    out[g0: g0 + 4 * k] = gaps.numpy().astype("<u4").view(np.uint8)
    out[g0 + 4 * k: g0 + 5 * k] = sym[positions].numpy().view(np.uint8)
    return out


def split_staging(layout: Layout, staging: torch.Tensor, staging_nbytes: int,
                  check: bool = True) -> tuple[torch.Tensor, torch.Tensor | PackedSymbols]:
    """fp16 scales and the symbols (int8 [N], or PackedSymbols) held in a uint8 staging tensor.

    Works on any device. ``check`` (host data) refuses escape positions outside the chunk, which a
    checksummed payload only has if its encoder was broken.
    """
    scales = staging[: layout.scales_nbytes].view(torch.float16)
    packing = layout.packing_of(staging_nbytes)
    if packing is None:
        return scales, staging[layout.symbols_offset: layout.staging_nbytes].view(torch.int8)
    k, has_offsets = packing
    nibbles = staging[layout.symbols_offset: layout.symbols_offset + layout.nibbles_nbytes]
    g0 = layout.escapes_offset
    key_offsets = None
    if has_offsets:
        key_offsets = staging[g0: g0 + layout.num_offsets].view(torch.int8).view(len(layout.rules), 1, layout.channels)
        g0 += layout.offsets_nbytes
    raw_gaps = staging[g0: g0 + 4 * k]
    if raw_gaps.storage_offset() % 4:  # a caller's buffer that starts off a 4-byte boundary
        raw_gaps = raw_gaps.clone()
    gaps = raw_gaps.view(torch.int32)
    positions = torch.cumsum(gaps, 0, dtype=torch.int64)
    if check and k and (int(gaps.min()) < 0 or int(positions[-1]) >= layout.symbols_nbytes):
        raise ChunkFormatError("chunk lists an escaped symbol outside its own symbols")
    values = staging[g0 + 4 * k: g0 + 5 * k].view(torch.int8)
    return scales, PackedSymbols(nibbles, positions, values, layout.plane_nbytes // 2, key_offsets)


def unpack_into(packed: PackedSymbols, out: torch.Tensor) -> None:
    """Write a chunk's packed symbols into int8 ``out`` [N], one per byte; any device.

    Three bit operations over the whole chunk, then a scatter of the few escapes. Whole-chunk ops
    because on a small core each torch call's fixed cost, not memory bandwidth, is what adds up.
    """
    if out.numel() != 2 * packed.nibbles.numel():
        raise ValueError(f"{packed.nibbles.numel()} packed bytes unpack into {2 * packed.nibbles.numel()} "
                         f"symbols, not {out.numel()}")
    dst = out.view(-1, 2, packed.half_plane)
    src = packed.nibbles.view(dst.shape[0], packed.half_plane)
    on_cpu = src.device.type == "cpu"
    four_i8, four_u8 = (_FOUR_I8, _FOUR_U8) if on_cpu else (4, 4)
    torch.bitwise_right_shift(src.view(torch.int8), four_i8, out=dst[:, 1])  # high nibble, sign-extended
    torch.bitwise_left_shift(src, four_u8, out=dst.view(torch.uint8)[:, 0])
    dst[:, 0].bitwise_right_shift_(four_i8)  # low nibble: shifted up, then back down with its sign
    if packed.key_offsets is not None:
        # Key symbols back from their channel's median. Escapes hold true values and are written
        # after; for every other symbol the sum is its true value, which is an int8.
        layers, _, channels = packed.key_offsets.shape
        out.view(layers, 2, -1, channels)[:, 0].add_(packed.key_offsets)
    if packed.positions.numel():
        out.index_put_((packed.positions,), packed.values)


class _Scratch(threading.local):
    def __init__(self) -> None:
        self.tensors: dict[tuple, torch.Tensor] = {}

    def get(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        key = (shape, dtype)
        t = self.tensors.get(key)
        if t is None:
            t = self.tensors[key] = torch.empty(shape, dtype=dtype)
        return t


_SCRATCH = _Scratch()


def dequantize_into(layout: Layout, scales16: torch.Tensor, symbols: torch.Tensor | PackedSymbols,
                    out: torch.Tensor) -> None:
    """Hot path: write ``symbols * scales`` into ``out`` [layers, 2, tokens, heads, head_dim].

    Packed symbols are first unpacked into a per-thread int8 scratch of the chunk's size. Then a
    few layers at a time go through a per-thread fp32 scratch that stays in L2 cache. Once warm it
    allocates nothing of the chunk's size. Torch kernels release the GIL, so several threads decode
    in parallel.
    """
    layers = len(layout.rules)
    t = layout.tokens
    heads, head_dim = out.shape[3], out.shape[4]
    scales = _SCRATCH.get((layout.num_scales,), torch.float32)
    scales.copy_(scales16)
    direct = out.dtype == torch.float32
    # A few layers per step: big enough to amortize per-op overhead, small enough for L2.
    group = max(1, min(layers, _BLOCK_ELEMS // max(1, 2 * t * heads * head_dim)))
    work = None if direct else _SCRATCH.get((group, 2, t, heads, head_dim), torch.float32)
    if isinstance(symbols, PackedSymbols):
        unpacked = _SCRATCH.get((layout.symbols_nbytes,), torch.int8)
        unpack_into(symbols, unpacked)
        symbols = unpacked
    sym = symbols.view(layers, 2, t, heads, head_dim)
    for l0 in range(0, layers, group):
        g = min(group, layers - l0)
        dst = out[l0: l0 + g] if direct else work[:g]
        dst.copy_(sym[l0: l0 + g])
        if layout.token_only:
            off = layout.offsets[l0 * 2][0]
            dst.mul_(scales[off: off + g * 2 * t].view(g, 2, t, 1, 1))
        else:
            for layer in range(l0, l0 + g):
                for kv in range(2):
                    s = layout.scale_view(scales, layer, kv)
                    per_token = layout.rules[layer][kv].axis == TOKEN
                    dst[layer - l0, kv].mul_(s.view(t, 1, 1) if per_token else s.view(1, heads, head_dim))
        if not direct:
            out[l0: l0 + g].copy_(dst)


def error_bound(layout: Layout, scales16: torch.Tensor) -> torch.Tensor:
    """Per-value bound on ``|x - dequantized|`` (before output rounding): ``s / 2``, shaped [L, 2, T, C]."""
    layers = len(layout.rules)
    bound = torch.empty(layers, 2, layout.tokens, layout.channels)
    scales = scales16.float()
    for layer in range(layers):
        for kv in range(2):
            bound[layer, kv] = layout.scale_view(scales, layer, kv).expand(layout.tokens, layout.channels) / 2
    return bound
