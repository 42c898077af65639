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

Symbols are stored one per byte in [layers, 2, tokens, channels] order so the lossless stage sees
byte-aligned, low-entropy data and dequantization reads it sequentially.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from shadowserve.errors import ChunkFormatError, ConfigError

TOKEN, CHANNEL = "token", "channel"
_FP16_MAX = 65504.0
_FP16_TINY = 2.0**-24  # smallest positive fp16 (subnormal): keeps all-zero rows divisible
_BLOCK_ELEMS = 512 * 1024  # fp32 scratch per dequantize step (2 MiB): measured best on this machine


@dataclass(frozen=True)
class PlaneRule:
    """How one (layer, K or V) plane is quantized."""

    kind: str  # "absmax" or "rms"
    param: float  # absmax: h (levels are -h..h); rms: step as a multiple of the row RMS
    axis: str = TOKEN  # scale per token row, or per channel (over the chunk's tokens)

    @property
    def max_level(self) -> int:
        return int(self.param) if self.kind == "absmax" else 127


def _h(bins: int) -> int:
    """Largest symmetric level that fits ``bins`` levels: 2h+1 <= bins."""
    return (bins - 1) // 2


def cachegen_split(layers: int, boundary_of_32: int) -> int:
    """Scale one of CacheGen's layer-group boundaries (given for 32 layers) to ``layers`` layers."""
    return max(1, round(boundary_of_32 * layers / 32))


def plan(quant: str, layers: int, bins: int = 16, key_step: float = 0.5,
         value_step: float = 1.0, layer_steps: tuple[float, ...] = ()) -> list[tuple[PlaneRule, PlaneRule]]:
    """The (key rule, value rule) of every layer for a quantization mode.

    ``layer_steps`` (rms): a multiplier of both steps per layer; () means 1 everywhere.
    """
    if quant == "rms":
        if layer_steps and len(layer_steps) != layers:
            raise ConfigError(f"layer_steps has {len(layer_steps)} multipliers but the model has {layers} layers")
        mult = layer_steps or (1.0,) * layers
        return [(PlaneRule("rms", key_step * m), PlaneRule("rms", value_step * m)) for m in mult]
    if quant == "int8":
        return [(PlaneRule("absmax", 127), PlaneRule("absmax", 127))] * layers
    if quant == "uniform":
        return [(PlaneRule("absmax", _h(bins)), PlaneRule("absmax", _h(bins)))] * layers
    if quant == "kivi":
        return [(PlaneRule("absmax", _h(bins), CHANNEL), PlaneRule("absmax", _h(bins)))] * layers
    if quant == "cachegen":
        # CacheGen's default for 32-layer models: keys 32 bins in layers 0-9, values in 0-1, 16 after.
        k_hi, v_hi = cachegen_split(layers, 10), cachegen_split(layers, 2)
        return [(PlaneRule("absmax", _h(32 if i < k_hi else 16)), PlaneRule("absmax", _h(32 if i < v_hi else 16)))
                for i in range(layers)]
    raise ValueError(f"no quantization plan for {quant!r}")


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
        self.staging_nbytes = self.symbols_offset + self.symbols_nbytes

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


def dequantize_into(layout: Layout, scales16: torch.Tensor, symbols: torch.Tensor, out: torch.Tensor) -> None:
    """Hot path: write ``symbols * scales`` into ``out`` [layers, 2, tokens, heads, head_dim].

    Works one layer at a time through a per-thread fp32 scratch that stays in L2 cache; once warm
    it allocates nothing. Torch kernels release the GIL, so several threads decode in parallel.
    """
    layers = len(layout.rules)
    t = layout.tokens
    heads, head_dim = out.shape[3], out.shape[4]
    scales = _SCRATCH.get((layout.num_scales,), torch.float32)
    scales.copy_(scales16)
    sym = symbols.view(layers, 2, t, heads, head_dim)
    direct = out.dtype == torch.float32
    # A few layers per step: big enough to amortize per-op overhead, small enough for L2.
    group = max(1, min(layers, _BLOCK_ELEMS // max(1, 2 * t * heads * head_dim)))
    work = None if direct else _SCRATCH.get((group, 2, t, heads, head_dim), torch.float32)
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
