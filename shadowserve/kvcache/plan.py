"""Quantization plans: which rule (absmax levels or an RMS step, per token or per channel) each
(layer, K/V) plane of a chunk follows, per quantization mode. The encoder applies them (quant.py); the
decoder never needs them, since every plane's scales travel in the chunk.
"""

from __future__ import annotations

from dataclasses import dataclass

from shadowserve.errors import ConfigError
from shadowserve.kvcache.schedules import mean_pair

TOKEN, CHANNEL = "token", "channel"


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
         value_step: float = 1.0, layer_steps: tuple[float, ...] = (),
         adapt: bool = False) -> list[tuple[PlaneRule, PlaneRule]]:
    """The (key rule, value rule) of every layer for a quantization mode.

    ``layer_steps`` (rms): one multiplier of both steps per layer, or two per layer (the key's, then
    the value's: ``k0, v0, k1, v1, ...``) so keys and values of each layer get their own precision;
    () means 1 everywhere. Encoder-side only: the decoder reads each plane's scales, whatever the step.
    ``adapt`` (a named schedule): a list of another length applies its mean key and value multipliers
    (``schedules.mean_pair``) in every layer instead of being refused.
    """
    if quant == "rms":
        if not layer_steps:
            pairs = [(1.0, 1.0)] * layers
        elif len(layer_steps) == layers:
            pairs = [(m, m) for m in layer_steps]
        elif len(layer_steps) == 2 * layers:
            pairs = list(zip(layer_steps[0::2], layer_steps[1::2]))
        elif adapt and len(layer_steps) % 2 == 0:
            pairs = [mean_pair(layer_steps)] * layers
        else:
            raise ConfigError(f"layer_steps has {len(layer_steps)} multipliers but the model has {layers} layers "
                              f"(give {layers}, one per layer, or {2 * layers}, a key and a value one per layer)")
        return [(PlaneRule("rms", key_step * mk), PlaneRule("rms", value_step * mv)) for mk, mv in pairs]
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
