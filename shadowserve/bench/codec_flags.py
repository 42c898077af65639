"""The codec flags shared by the fetch benchmarks (kept apart from the harness so parsing stays light)."""

from __future__ import annotations

import argparse

from shadowserve.config import CodecConfig


def add_codec_arguments(p: argparse.ArgumentParser) -> None:
    """The codec flags every fetch benchmark takes (defaults: the default codec)."""
    p.add_argument("--quant", default=None, help="KV quantization (default: the default codec's)")
    p.add_argument("--lossless", default=None, help="lossless stage (default: the default codec's)")
    p.add_argument("--one-byte-symbols", action="store_true",
                   help="store quantized symbols one per byte, as before symbols were packed two per byte")
    p.add_argument("--min-saving", type=float, default=None,
                   help="store a chunk raw when its lossless stage saves less than this share "
                        "(default: the default codec's; 0 always keeps the stage)")


def codec_from_args(args: argparse.Namespace) -> CodecConfig:
    settings = {k: v for k, v in (("quant", args.quant), ("lossless", args.lossless)) if v}
    if args.min_saving is not None:
        settings["min_saving"] = args.min_saving
    return CodecConfig(**settings, pack_nibbles=not args.one_byte_symbols)
