"""Where a lossy chunk's scales and symbols sit in its staging bytes (what the lossless stage carries).

The staging holds fp16 scales, then the symbols in [layers, 2, tokens, channels] order, in one of two
layouts (kvcache/packing.py describes the second):

* one int8 per symbol (always possible); its size, ``Layout.staging_nbytes``, is the most a chunk needs;
* **packed**: a symbol table, then each (layer, K/V) plane two symbols per byte (nibbles, with escapes
  for the few symbols outside ``[-8, 7]``) or, for planes where too many would escape, one per byte.

A staging of exactly ``staging_nbytes`` is the first layout; any smaller one is packed, and its table
says how (escape count, key offsets or not, each plane's width), so its exact size can be checked.

A layout also carries what turns symbols back into values besides the scales: the channels' step
multipliers, when the codec gives key channels or single heads their own steps (kvcache/channel_steps.py).
"""

from __future__ import annotations

import torch

from shadowserve.errors import ChunkFormatError
from shadowserve.kvcache.plan import TOKEN, PlaneRule

ESCAPE_NBYTES = 5  # uint32 gap to the previous escape + the int8 value
MAX_ESCAPE_SHARE = 32  # a packed chunk holds at most 1/32 of its symbols as escapes
TABLE_HEAD_NBYTES = 5  # uint32 escape count + uint8 flags; then one width byte per plane


def _align(n: int, to: int) -> int:
    return (n + to - 1) // to * to


class Layout:
    """Offsets and sizes of both symbol layouts, for one chunk shape and plan."""

    def __init__(self, rules: list[tuple[PlaneRule, PlaneRule]], tokens: int, channels: int,
                 steps: torch.Tensor | None = None, rms_steps: torch.Tensor | None = None) -> None:
        self.rules = rules
        for name, t in (("steps", steps), ("rms_steps", rms_steps)):
            if t is not None and tuple(t.shape) != (len(rules), 2, channels):
                raise ValueError(f"{name} must be [layers, 2, channels] = [{len(rules)}, 2, {channels}], "
                                 f"got {list(t.shape)}")
        if rms_steps is not None and steps is None:
            raise ValueError("rms_steps needs steps")
        # Channel c of plane (l, kv) is quantized with step scale x steps[l, kv, c] (None: all 1); the
        # row's RMS is taken of x / rms_steps (None: the same as steps). The decoder needs only steps.
        self.steps = None if steps is None else steps.float().contiguous()
        self.rms_steps = None if rms_steps is None else rms_steps.float().contiguous()
        # Which layers' key / value planes have any multiplier other than 1 (the decoder skips the rest).
        self.scaled: tuple[tuple[int, ...], tuple[int, ...]] = ((), ())
        if self.steps is not None:
            ones = (self.steps == 1).all(-1)
            self.scaled = tuple(tuple(i for i in range(len(rules)) if not bool(ones[i, kv])) for kv in (0, 1))
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
        self.symbols_offset = _align(self.scales_nbytes, 64)  # keep symbols cache-line aligned
        self.planes = 2 * len(rules)
        self.plane_nbytes = tokens * channels
        self.symbols_nbytes = self.planes * self.plane_nbytes
        self.staging_nbytes = self.symbols_offset + self.symbols_nbytes  # one byte per symbol
        # Packed: the table, then the plane data (8-byte aligned), then key offsets and escapes.
        self.table_nbytes = _align(TABLE_HEAD_NBYTES + self.planes, 8)
        self.data_offset = self.symbols_offset + self.table_nbytes
        self.max_escapes = self.symbols_nbytes // MAX_ESCAPE_SHARE
        self.num_offsets = len(rules) * channels  # int8, one per (layer, key channel)
        self.offsets_nbytes = _align(self.num_offsets, 4)  # escape gaps stay 4-byte aligned
        self.packable = self.plane_nbytes % 2 == 0 and self.packed_nbytes(0) < self.staging_nbytes
        self.offsets_packable = self.packable and self.packed_nbytes(0, offsets=True) < self.staging_nbytes

    def data_nbytes(self, wide: int) -> int:
        """Bytes of plane data when ``wide`` planes are one byte per symbol and the rest two per byte."""
        return (self.planes - wide) * (self.plane_nbytes // 2) + wide * self.plane_nbytes

    def offsets_offset(self, wide: int = 0) -> int:
        """Where a packed chunk's key offsets (if any) start: after the plane data, 4-byte aligned."""
        return _align(self.data_offset + self.data_nbytes(wide), 4)

    def escapes_offset(self, wide: int = 0, offsets: bool = False) -> int:
        """Where the escape gaps of a packed chunk start."""
        return self.offsets_offset(wide) + (self.offsets_nbytes if offsets else 0)

    def packed_nbytes(self, escapes: int, offsets: bool = False, wide: int = 0) -> int:
        """Staging size of a packed chunk with ``escapes`` escaped symbols, ``wide`` one-byte planes and,
        with ``offsets``, per-channel key offsets."""
        return self.escapes_offset(wide, offsets) + ESCAPE_NBYTES * escapes

    def check_staging_nbytes(self, staging_nbytes: int) -> None:
        """Refuse a staging size that neither layout can have (before inflating a payload)."""
        if staging_nbytes == self.staging_nbytes:
            return
        if not (self.packable and self.packed_nbytes(0) <= staging_nbytes < self.staging_nbytes):
            raise ChunkFormatError(
                f"chunk claims {staging_nbytes} staging bytes, which no symbol layout of its shape has "
                f"(one byte per symbol: {self.staging_nbytes})")

    def scale_view(self, scales, layer: int, kv: int):
        """One plane's scales shaped to broadcast over [tokens, channels]."""
        off, n = self.offsets[layer * 2 + kv]
        s = scales[off: off + n]
        return s.view(n, 1) if self.rules[layer][kv].axis == TOKEN else s.view(1, n)
