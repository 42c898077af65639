"""Symmetric scalar quantization of KV chunks: one int8 symbol per value plus fp16 scales.

Every (layer, K/V) plane of a chunk is quantized as ``q = round(x / s)`` with a scale ``s`` per
token (a row of kv_heads*head_dim channels) or, for KIVI-style keys, per channel. The reconstruction
``q * s`` is off by at most ``s / 2`` per value (plus the rounding of the output dtype): scales are
stored in fp16 and rounded *up* before use, so clipping never happens and the bound is exact.

With per-channel steps (kvcache/channel_steps.py: key channels by the queries' energy, single heads
finer) channel ``c`` of a plane is quantized as ``round(x / (s * m_c))``: the values are divided by
their multipliers ``m`` first, and the decoder multiplies them back, so the bound becomes
``s * m_c / 2``. The row's RMS is measured through the channel table alone, never the head steps.

How ``s`` is chosen is the only difference between the modes:

* ``absmax`` rules (CacheGen, uniform, int8, KIVI): ``s = max|x| / h`` with ``2h+1`` levels.
* ``rms`` rule (our default): ``s = step * rms(x_row)``, an entropy-constrained quantizer. The
  symbol range is left open (up to +-127) and the lossless stage pays only for the levels that
  occur; outliers no longer coarsen every other channel of their token.

Where scales and symbols sit in the staging bytes: kvcache/layout.py; symbols stored two per byte:
kvcache/packing.py.
"""

from __future__ import annotations

import threading

import torch

from shadowserve.errors import ChunkFormatError
from shadowserve.kvcache.layout import Layout
from shadowserve.kvcache.packing import PackedSymbols, unpack_into
from shadowserve.kvcache.plan import TOKEN, PlaneRule

_FP16_MAX = 65504.0
_FP16_TINY = 2.0**-24  # smallest positive fp16 (subnormal): keeps all-zero rows divisible
_BLOCK_ELEMS = 512 * 1024  # fp32 scratch per dequantize step (2 MiB): measured best on this machine


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


def _plane_scales(x: torch.Tensor, rule: PlaneRule, x_rms: torch.Tensor) -> torch.Tensor:
    """fp32 scales for a [tokens, channels] plane (before fp16 rounding); ``x_rms`` is what the RMS
    rule measures (``x`` but for head steps)."""
    dim = 1 if rule.axis == TOKEN else 0
    amax = x.abs().amax(dim)
    if rule.kind == "absmax":
        return amax / rule.param
    rms = x_rms.square().mean(dim).sqrt()
    return torch.maximum(rms * rule.param, amax / 127.0)


def quantize(x: torch.Tensor, layout: Layout, scales_out: torch.Tensor, symbols_out: torch.Tensor) -> None:
    """Quantize fp32 KV ``x`` [layers, 2, tokens, channels] into fp16 ``scales_out`` and int8 ``symbols_out``.

    Encode path (the save side); it allocates temporaries of the chunk's size.
    """
    layers = len(layout.rules)
    x_rms = x
    if layout.steps is not None:
        x_rms = x / (layout.steps if layout.rms_steps is None else layout.rms_steps)[:, :, None, :]
        x = x_rms if layout.rms_steps is None else x / layout.steps[:, :, None, :]
    if layout.token_only:
        # All planes scale per token: do every layer at once.
        amax = x.abs().amax(-1)  # [L, 2, T]
        kind = [[r.kind for r in pair] for pair in layout.rules]
        param = torch.tensor([[r.param for r in pair] for pair in layout.rules], dtype=torch.float32)[..., None]
        is_rms = torch.tensor([[k == "rms" for k in pair] for pair in kind])[..., None]
        s = amax / torch.where(is_rms, torch.full_like(param, 127.0), param)
        if bool(is_rms.any()):
            rms = x_rms.square().mean(-1).sqrt()
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
            s16 = _round_up_fp16(_plane_scales(plane, rule, x_rms[layer, kv]))
            off, n = layout.offsets[layer * 2 + kv]
            scales_out[off: off + n].copy_(s16)
            view = layout.scale_view(scales_out, layer, kv).float()
            h = rule.max_level
            sym[layer, kv].copy_(torch.div(plane, view).round_().clamp_(-h, h))


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
    steps = None if layout.steps is None else layout.steps.view(layers, 2, 1, heads, head_dim)
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
        if steps is not None:
            _multiply_steps(dst, steps, layout.scaled, l0, g)
        if not direct:
            out[l0: l0 + g].copy_(dst)


def _multiply_steps(dst: torch.Tensor, steps: torch.Tensor, scaled: tuple[tuple[int, ...], tuple[int, ...]],
                    l0: int, g: int) -> None:
    """``dst`` (layers ``l0 .. l0+g``) times the channels' step multipliers, plane by plane where they
    are not all 1, and one op over the group when every layer's keys (or values) have them."""
    for kv in (0, 1):
        layers = [i for i in scaled[kv] if l0 <= i < l0 + g]
        if len(layers) == g:
            dst[:g, kv].mul_(steps[l0: l0 + g, kv])
        else:
            for i in layers:
                dst[i - l0, kv].mul_(steps[i, kv])


def error_bound(layout: Layout, scales16: torch.Tensor) -> torch.Tensor:
    """Per-value bound on ``|x - dequantized|`` (before output rounding): ``s / 2``, shaped [L, 2, T, C]."""
    layers = len(layout.rules)
    bound = torch.empty(layers, 2, layout.tokens, layout.channels)
    scales = scales16.float()
    for layer in range(layers):
        for kv in range(2):
            bound[layer, kv] = layout.scale_view(scales, layer, kv).expand(layout.tokens, layout.channels) / 2
    if layout.steps is not None:
        bound.mul_(layout.steps[:, :, None, :])
    return bound
