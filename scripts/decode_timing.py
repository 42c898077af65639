"""Decode speed of bench codec presets, interleaved, one thread: which codec decodes faster, at ~1% resolution.

``bench codec`` times one codec after another, so on a shared machine its GB/s column moves by ±30% between
runs. Here every round times each codec once in turn, on bench codec's chunks (SmolLM2 KV of 2048 tokens of
its text, 8 chunks of 256), and the best round of each is kept: ``KVCodec.decompress_into`` (inflate) and
``dequantize_into`` into a reused staging buffer and fp16 tensor, as the data plane does; then, per codec, the
best round of each stage on its own (the steadier figure where two codecs share a stage's code). It also prints
each codec's ratio vs fp16 on those chunks, and how its chunks pack (symbol bytes against one per symbol,
byte-wide planes). A codec may carry encode-side bars (``kvcache/packing.py``), joined by ``:`` as in
``NAME:cuts=0:pairs=0``, which never change the decoded KV: ``NAME:wide=0.03`` (``WIDE_SHARE``), ``NAME:max=1`` (``MAX_PACKED_SHARE``),
``NAME:wide=1`` (no byte-wide planes: every out-of-range symbol escapes, the layout before KV format 3),
``NAME:pairs=0`` (nibbles pair symbols half a plane apart, not neighbouring tokens: before KV format 4), or
``NAME:cuts=0`` (zstd blocks that straddle planes: before session 18), or ``NAME:cutprice=N`` (a block ends at a
plane start where an order-0 estimate says its own Huffman table saves more than N bytes, the lossless stage's
``CUT_PRICE_NBYTES``; ``cutprice=0``: at every plane start, as in session 18).
Usage::

    python scripts/decode_timing.py --codecs default,balanced,planes-qa-balanced-smollm2 --rounds 15
    python scripts/decode_timing.py --codecs planes-qa-5x-smollm2,planes-qa-5x-smollm2:wide=1,high,high:max=1
    python scripts/decode_timing.py --codecs default,default:pairs=0,balanced,balanced:pairs=0
    python scripts/decode_timing.py --codecs balanced,balanced:cuts=0,balanced:cuts=0:pairs=0
    python scripts/decode_timing.py --codecs default,default:cutprice=0,rms-keyoffsets-zstd,rms-keyoffsets-zstd:cutprice=0
"""

from __future__ import annotations

import argparse
import functools

import numpy as np
import torch

from shadowserve.bench.suites.codec import _load, _prefill, _text, decode_pass, resolve_preset
from shadowserve.kvcache import lossless, packing
from shadowserve.kvcache.codec import KVCodec

_BARS = {"wide": ("wide_share", float), "max": ("max_share", float), "pairs": ("token_pairs", lambda v: v != "0")}
_CUTS = "cuts"  # not a packer bar: cuts=0 gives the lossless stage no plane starts
_CUT_PRICE = "cutprice"  # nor this: the lossless stage's CUT_PRICE_NBYTES (0: a block per plane, session 18)


def _encode(name: str, chunks: list[torch.Tensor]) -> tuple[KVCodec, list[bytes], float]:
    """``name``'s chunks, packed with the bars it names (``preset:wide=X:max=Y``), and the plane starts per
    chunk where zstd ended a block."""
    preset, _, bars = name.partition(":")
    pairs = dict(b.split("=") for b in bars.split(":") if b)
    no_cuts = pairs.pop(_CUTS, "1") == "0"
    price = pairs.pop(_CUT_PRICE, None)
    kwargs = {_BARS[k][0]: _BARS[k][1](v) for k, v in pairs.items()}
    codec = KVCodec(resolve_preset(preset), "bench:decode-timing")
    default, starts, cut_price = packing.pack_staging, packing.plane_starts, lossless.CUT_PRICE_NBYTES
    paying, kept = lossless._paying, []
    packing.pack_staging = functools.partial(default, **kwargs)  # the encoder's only call into the packer

    def counted(*args, **kwargs) -> list[int]:  # the cuts zstd makes, counted
        kept.append(paying(*args, **kwargs))
        return kept[-1]

    lossless._paying = counted
    if no_cuts:
        packing.plane_starts = lambda *_: []
    if price is not None:
        lossless.CUT_PRICE_NBYTES = int(price)
    try:
        blobs = [codec.encode(c) for c in chunks]
        return codec, blobs, sum(len(k) for k in kept) / len(chunks)
    finally:
        packing.pack_staging, packing.plane_starts, lossless.CUT_PRICE_NBYTES = default, starts, cut_price
        lossless._paying = paying


def _packing_summary(codec: KVCodec, blobs: list[bytes], shape: tuple[int, ...]) -> str:
    """Mean packed symbol bytes per one-byte symbol, byte-wide planes and escapes per chunk."""
    layout = codec.layout_of(shape)
    staging = np.empty(codec.max_staging_nbytes(shape), np.uint8)
    shares, wide, escapes = [], [], []
    for blob in blobs:
        n = codec.decompress_into(blob, staging).staging_nbytes
        table = packing.read_packing(layout, torch.from_numpy(staging), n)
        shares.append(1.0 if table is None else (n - layout.symbols_offset) / layout.symbols_nbytes)
        wide.append(0 if table is None else sum(table.wide))
        escapes.append(0 if table is None else table.escapes)
    return (f"symbols {np.mean(shares):4.0%} of one byte, {np.mean(wide):4.1f} byte-wide planes, "
            f"{np.mean(escapes):6.0f} escapes")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--codecs", default="default,balanced", help="bench codec presets, comma-separated")
    p.add_argument("--rounds", type=int, default=15)
    args = p.parse_args()
    names = args.codecs.split(",")
    torch.set_num_threads(2)
    tok, model = _load("smollm2-135m")
    kv = _prefill(model, tok(_text()[:400_000], return_tensors="pt").input_ids[:, :2048])
    torch.set_num_threads(1)
    chunks = [kv[:, :, i:i + 256].half().contiguous() for i in range(0, 2048, 256)]
    shape = tuple(chunks[0].shape)
    coded, cuts = {}, {}
    for n in names:
        codec, blobs, cuts[n] = _encode(n, chunks)
        coded[n] = (codec, blobs, bytearray(codec.max_staging_nbytes(shape)))
    out = torch.empty(shape, dtype=torch.float16)
    best = {n: (float("inf"), 0.0, 0.0) for n in names}
    stage_best = {n: [float("inf"), float("inf")] for n in names}
    for _ in range(args.rounds):
        for n in names:
            inflate, dequant = decode_pass(*coded[n], out)
            if inflate + dequant < best[n][0]:
                best[n] = (inflate + dequant, inflate, dequant)
            stage_best[n] = [min(stage_best[n][0], inflate), min(stage_best[n][1], dequant)]
    gb = sum(c.numel() * 2 for c in chunks) / 1e9
    k = len(chunks)
    for n in names:
        total, inflate, dequant = best[n]
        ratio = gb * 1e9 / sum(len(b) for b in coded[n][1])
        print(f"{n:32s} ratio {ratio:5.2f}  decode {gb / total:5.2f} GB/s   per chunk {total * 1e3 / k:.2f} ms "
              f"(inflate {inflate * 1e3 / k:.2f}, dequantize {dequant * 1e3 / k:.2f})   "
              f"{_packing_summary(coded[n][0], coded[n][1], shape)}, {cuts[n]:4.1f} block cuts")
    print("best of each stage on its own (a stage's noise does not pick the other's round):")
    for n in names:
        inflate, dequant = stage_best[n]
        print(f"{n:32s} decode {gb / (inflate + dequant):5.2f} GB/s   per chunk {(inflate + dequant) * 1e3 / k:.3f} ms "
              f"(inflate {inflate * 1e3 / k:.3f}, dequantize {dequant * 1e3 / k:.3f})")


if __name__ == "__main__":
    main()
