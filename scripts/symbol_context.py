"""What a chunk's symbols hold beyond what zstd's order-0 Huffman codes take, and what zstd levels do.

Encodes bench codec's KV (2048 tokens of its text, chunks of 256) with a preset, reads the symbols back
from the real chunks (keys relative to their channel's median, as packed), and prints per K/V, in bits per
symbol, order-0 entropy estimates of the symbols as nibble bytes would pair them: half a plane apart (KV
format 3), neighbouring tokens of one channel (format 4), token pairs with the plane's channels in four
groups by their spread, each group its own Huffman table (a zstd block per group; 60 bytes per table
counted, the grouping itself not), and per channel (what a coder modelling each channel could reach).
Then the chunks' ratio and encode time at several zstd levels, one stream and no plane blocks, on the
same stagings.

    python scripts/symbol_context.py --codec balanced --levels 1,3,6,9,12,15,16
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import zstandard

from shadowserve.bench.suites.codec import _load, _prefill, _text, resolve_preset
from shadowserve.kvcache import packing
from shadowserve.kvcache.codec import KVCodec


def _bits(x: torch.Tensor) -> float:
    """Order-0 entropy of ``x``'s values, in bits for all of them."""
    counts = torch.unique(x, return_counts=True)[1].double()
    return float(-(counts * (counts / counts.sum()).log2()).sum())


GROUPS, TABLE_BITS = 4, 60 * 8


def _pair_bits(s: torch.Tensor) -> float:
    half = s.shape[0] // 2
    return _bits(s[0:2 * half:2] * 1000 + s[1:2 * half:2])


def estimates(symbols: torch.Tensor) -> dict[str, float]:
    """Bits per symbol of one plane's int symbols [tokens, channels] under four pairings/contexts."""
    t, c = symbols.shape
    s = symbols.long()
    half = t // 2
    groups = torch.tensor_split(torch.argsort(s.float().std(0)), GROUPS)
    return {"half_plane_pairs": _bits(s[:half] * 1000 + s[half:2 * half]) / (2 * half * c),
            "token_pairs": _pair_bits(s) / (2 * half * c),
            f"token_pairs_{GROUPS}_channel_groups": (sum(_pair_bits(s[:, g]) for g in groups)
                                                     + (GROUPS - 1) * TABLE_BITS) / (2 * half * c),
            "per_channel": sum(_bits(s[:, i]) for i in range(c)) / (t * c)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--codec", default="balanced", help="bench codec preset")
    p.add_argument("--levels", default="1,3,6,9,12,15,16", help="zstd levels to try on the stagings")
    args = p.parse_args()
    torch.set_num_threads(2)
    tok, model = _load("smollm2-135m")
    kv = _prefill(model, tok(_text()[:400_000], return_tensors="pt").input_ids[:, :2048])
    codec = KVCodec(resolve_preset(args.codec), "bench:symbol-context")
    sums = {kv_i: {} for kv_i in (0, 1)}
    stagings = []
    for i in range(0, kv.shape[2], 256):
        chunk = kv[:, :, i:i + 256].half().contiguous()
        staging = np.zeros(codec.max_staging_nbytes(tuple(chunk.shape)), np.uint8)
        n = codec.decompress_into(codec.encode(chunk), staging).staging_nbytes
        stagings.append(staging[:n].tobytes())
        layout = codec.layout_of(tuple(chunk.shape))
        _, symbols = packing.split_staging(layout, torch.from_numpy(staging), n)
        if isinstance(symbols, packing.PackedSymbols):
            flat = torch.empty(layout.symbols_nbytes, dtype=torch.int8)
            packing.unpack_into(symbols, flat)
            symbols = flat
        planes = symbols.view(len(layout.rules), 2, layout.tokens, layout.channels).to(torch.int16)
        for layer in range(len(layout.rules)):
            for kv_i in (0, 1):
                s = planes[layer, kv_i]
                if kv_i == 0:
                    s = s - s.median(0).values  # keys as packed: relative to their channel's median
                for name, bits in estimates(s).items():
                    sums[kv_i][name] = sums[kv_i].get(name, 0.0) + bits
    planes_total = len(stagings) * len(layout.rules)
    for kv_i, name in ((0, "keys"), (1, "values")):
        print(f"{name:6s} bits per symbol: " + ", ".join(f"{k} {v / planes_total:.3f}" for k, v in sums[kv_i].items()))
    raw = kv.numel() * 2
    for level in (int(x) for x in args.levels.split(",")):
        comp = zstandard.ZstdCompressor(level=level)
        t0 = time.perf_counter()
        size = sum(len(comp.compress(s)) for s in stagings)
        ms = (time.perf_counter() - t0) * 1e3 / len(stagings)
        print(f"zstd level {level:2d}: ratio {raw / size:.2f}, encode {ms:.1f} ms per chunk")


if __name__ == "__main__":
    main()
