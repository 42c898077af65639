"""The codec flags shared by the fetch benchmarks (kept apart from the harness so parsing stays light)."""

from __future__ import annotations

import argparse

from shadowserve.config import CodecConfig
from shadowserve.kvcache.levels import DEFAULT_QUALITY, QUALITY_LEVELS, codec_for_quality


def add_codec_arguments(p: argparse.ArgumentParser) -> None:
    """The codec flags every fetch benchmark takes (defaults: the default quality level's codec)."""
    p.add_argument("--kv-quality", default=DEFAULT_QUALITY, choices=list(QUALITY_LEVELS),
                   help=f"KV codec by quality level (default {DEFAULT_QUALITY}); the flags below override it")
    p.add_argument("--quant", default=None, help="KV quantization (default: the default codec's)")
    p.add_argument("--lossless", default=None, help="lossless stage (default: the default codec's)")
    p.add_argument("--one-byte-symbols", action="store_true",
                   help="store quantized symbols one per byte, as before symbols were packed two per byte")
    p.add_argument("--lossless-block", type=int, default=None,
                   help="compress chunks as independent lossless blocks of this many bytes (a multiple of "
                        "4096 up to 65536; format version 3, for GPU batched decoders); 0: one stream")
    p.add_argument("--min-saving", type=float, default=None,
                   help="store a chunk raw when its lossless stage saves less than this share "
                        "(default: the default codec's; 0 always keeps the stage)")


def codec_from_args(args: argparse.Namespace) -> CodecConfig:
    settings = {k: v for k, v in (("quant", args.quant), ("lossless", args.lossless)) if v}
    if args.min_saving is not None:
        settings["min_saving"] = args.min_saving
    if args.lossless_block is not None:
        settings["lossless_block"] = args.lossless_block
    if args.one_byte_symbols:
        settings["pack_nibbles"] = False
    return codec_for_quality(args.kv_quality, **settings)
