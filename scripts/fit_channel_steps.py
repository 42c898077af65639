"""Measure how hard each key channel is looked at, for per-channel key steps (kvcache/channel_steps.py).

An error ``e`` in key channel ``c`` moves an attention logit by ``q_c * e``, so the logit error of a
quantized key has variance ``sum_c E[q_c^2] * step_c^2 / 12``. For a fixed number of bits the steps
that minimize it go as ``E[q_c^2] ** -1/2`` (``key_channel_power=1``). This script measures
``E[q_c^2]`` per (layer, KV head, channel) on calibration text: the mean over tokens and over the
query heads that share the KV head, with each RoPE pair (c, c + head_dim/2) averaged, since the
rotation mixes the two. Each layer's values are scaled to a geometric mean of 1.

The text is pydoc prose from token 40000 on, which neither ``bench codec`` (tokens 0-2304) nor
``bench quality``'s tasks score. Usage::

    python scripts/fit_channel_steps.py --json shadowserve/kvcache/channel_steps/smollm2-135m.json
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from shadowserve.bench.suites.codec import _load, _text

WINDOWS = (40_000, 50_000, 60_000, 70_000)  # calibration windows: first tokens
WINDOW = 2048


@torch.no_grad()
def query_energy(model, ids: torch.Tensor) -> torch.Tensor:
    """Mean squared query per (layer, KV head, channel) over every window, before RoPE."""
    cfg = model.config
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = cfg.hidden_size // heads
    sums = torch.zeros(cfg.num_hidden_layers, heads, head_dim, dtype=torch.float64)
    count = 0

    def hook(layer: int):
        def f(_mod, _inp, out):
            sums[layer] += out[0].reshape(-1, heads, head_dim).double().square().sum(0)
        return f

    handles = [layer.self_attn.q_proj.register_forward_hook(hook(i)) for i, layer in enumerate(model.model.layers)]
    try:
        for start in WINDOWS:
            window = ids[:, start:start + WINDOW]
            model(window)
            count += window.shape[1]
    finally:
        for h in handles:
            h.remove()
    energy = (sums / count).reshape(cfg.num_hidden_layers, kv_heads, heads // kv_heads, head_dim).mean(2)
    energy = (energy + energy.roll(head_dim // 2, dims=2)) / 2  # a RoPE pair shares one step
    log = energy.log()
    return (log - log.mean(dim=(1, 2), keepdim=True)).exp()


def output_weights(model) -> torch.Tensor:
    """Squared norm of each output-projection column per (layer, KV head, channel): how much an error in
    that value channel moves the layer's output (mean over the query heads sharing the KV head)."""
    cfg = model.config
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = cfg.hidden_size // heads
    cols = [layer.self_attn.o_proj.weight.detach().double().square().sum(0) for layer in model.model.layers]
    return torch.stack(cols).reshape(cfg.num_hidden_layers, kv_heads, heads // kv_heads, head_dim).mean(2)


def _amgm(x: torch.Tensor) -> str:
    """Per layer, arithmetic over geometric mean: how much a per-channel step can gain there."""
    ratio = x.mean(dim=(1, 2)) / x.log().mean(dim=(1, 2)).exp()
    return " ".join(f"{r:.2f}" for r in ratio.tolist())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", required=True, help="write the table here")
    args = p.parse_args()
    torch.set_num_threads(2)
    tok, model = _load("smollm2-135m")
    ids = tok(_text()[:400_000], return_tensors="pt").input_ids
    if ids.shape[1] < WINDOWS[-1] + WINDOW:
        raise SystemExit("the calibration text is too short")
    energy = query_energy(model, ids)
    table = {
        "model": "smollm2-135m",
        "what": "mean squared query per (layer, kv head, channel), RoPE pairs averaged, geometric mean 1 per layer",
        "command": "python scripts/fit_channel_steps.py --json shadowserve/kvcache/channel_steps/smollm2-135m.json",
        "calibration_tokens": [[s, s + WINDOW] for s in WINDOWS],
        "shape": list(energy.shape),
        "query_energy": [[[float(f"{x:.4g}") for x in head] for head in layer] for layer in energy.tolist()],
    }
    with open(args.json, "w") as f:
        json.dump(table, f, indent=None, separators=(",", ":"))
        f.write("\n")
    print("AM/GM of the query energy per layer (keys): " + _amgm(energy))
    print("AM/GM of the squared output-projection column norms per layer (values): " + _amgm(output_weights(model)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
