"""Lossless stages: deflate (libdeflate), zstd, lz4 and none, each able to decompress *into* a buffer.

The Python bindings of these libraries only return fresh ``bytes``; on the decode hot path that
means a multi-megabyte allocation per chunk, and fresh memory is several times slower to write
than reused memory. So decompression calls the C libraries directly through ``ctypes`` — the very
shared objects those bindings ship (their symbols are exported), falling back to a system copy —
writing straight into the caller's staging buffer. ``ctypes`` releases the GIL for the call, so
several threads decompress in parallel. Decompressor contexts are per thread (neither libdeflate's
nor zstd's may be shared between threads) and made once per thread.

If no C entry point can be found, a stage falls back to its Python binding plus one copy: slower,
still correct. Compression (the save path) uses the Python bindings; it allocates its output.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import threading
from collections.abc import Callable, Sequence
from typing import Any

import deflate
import lz4.block
import numpy as np
import torch
import zstandard

from shadowserve.config import LOSSLESS_LEVELS, check_lossless_level
from shadowserve.errors import ChunkFormatError, ConfigError

LOSSLESS_STAGES = ("deflate", "zstd", "lz4", "none")

def default_level(stage: str) -> int:
    """The level a stage uses when the config says 0."""
    return LOSSLESS_LEVELS[stage][0]


def as_u8(buf: Any, writable: bool = False) -> np.ndarray:
    """View any contiguous buffer (bytes, bytearray, memoryview, numpy array) as flat uint8, no copy."""
    if isinstance(buf, np.ndarray):
        if not buf.flags.c_contiguous:
            raise ValueError("buffer must be C-contiguous")
        arr = buf.reshape(-1).view(np.uint8)
    else:
        arr = np.frombuffer(buf, dtype=np.uint8)
    if writable and not arr.flags.writeable:
        raise ValueError("destination buffer is read-only")
    return arr


def _addr(arr: np.ndarray) -> int:
    return arr.__array_interface__["data"][0]


def _load(module_name: str, pattern: str, system_name: str, symbol: str) -> ctypes.CDLL | None:
    """Find a shared object exporting ``symbol``: the binding's own extension first, then the system's."""
    candidates: list[str] = []
    try:
        module = __import__(module_name, fromlist=["_"])
        candidates += sorted(glob.glob(os.path.join(os.path.dirname(module.__file__), pattern)))
    except ImportError:
        pass
    found = ctypes.util.find_library(system_name)
    if found:
        candidates.append(found)
    for path in candidates:
        try:
            lib = ctypes.CDLL(path)
            getattr(lib, symbol)
            return lib
        except (OSError, AttributeError):
            continue
    return None


class LosslessStage:
    """One lossless format. ``decompress_into`` must fill ``dst`` exactly or raise ChunkFormatError."""

    name = "none"
    native = True

    def __init__(self, level: int = 0) -> None:
        check_lossless_level(self.name, level)
        self.level = level or default_level(self.name)

    def compress(self, data: Any, cuts: Sequence[int] = ()) -> bytes:
        """``data`` coded. ``cuts``: ascending offsets where the data's statistics change (the start of
        each symbol plane); a stage that codes in blocks may start a block there. Never changes what
        ``decompress_into`` returns."""
        return bytes(as_u8(data))

    def decompress_into(self, src: Any, dst: np.ndarray) -> None:
        """Hot path: write exactly ``dst.nbytes`` decompressed bytes into ``dst``; allocates nothing."""
        s = as_u8(src)
        if s.nbytes != dst.nbytes:
            raise ChunkFormatError(f"stored payload is {s.nbytes} bytes, expected {dst.nbytes}")
        np.copyto(dst, s)

    def decompress_blocks_into(self, src: np.ndarray, dst: np.ndarray,
                               blocks: list[tuple[int, int, int, int]]) -> None:
        """Decode independent blocks ``(src offset, src bytes, dst offset, dst bytes)`` of ``src`` into
        their slices of ``dst`` (a blocked payload, kvcache/blocks.py). The caller has checked that every
        range lies inside its buffer. Native stages look up their decoder context once per chunk and call
        the C decoder once per block on raw addresses; each block must fill its slice exactly."""
        make = getattr(self, "_native_decoder", None)
        if make is None or not self.native:
            for so, sn, do, dn in blocks:
                self.decompress_into(src[so: so + sn], dst[do: do + dn])
            return
        decode, s, d = make(), _addr(src), _addr(dst)
        for so, sn, do, dn in blocks:
            decode(s + so, sn, d + do, dn)


class _PerThread(threading.local):
    """Per-thread native contexts; freed when the thread ends."""

    def __init__(self) -> None:
        self.handles: dict[str, tuple[int, Callable[[int], None]]] = {}

    def get(self, key: str, make: Callable[[], int], free: Callable[[int], None]) -> int:
        entry = self.handles.get(key)
        if entry is None:
            handle = make()
            if not handle:
                raise MemoryError(f"could not allocate a {key} context")
            entry = (handle, free)
            self.handles[key] = entry
        return entry[0]

    def __del__(self) -> None:
        for handle, free in self.handles.values():
            try:
                free(handle)
            except Exception:  # pragma: no cover - interpreter shutdown
                pass


_TLS = _PerThread()


class DeflateStage(LosslessStage):
    """Raw DEFLATE (RFC 1951) through libdeflate: the format SmartNIC decompression engines accept."""

    name = "deflate"
    _lib = _load("deflate", "_deflate*.so", "deflate", "libdeflate_deflate_decompress_ex")
    if _lib is not None:
        _lib.libdeflate_alloc_decompressor.restype = ctypes.c_void_p
        _lib.libdeflate_free_decompressor.argtypes = [ctypes.c_void_p]
        _lib.libdeflate_deflate_decompress_ex.restype = ctypes.c_int
        _lib.libdeflate_deflate_decompress_ex.argtypes = [
            ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t,
            ctypes.POINTER(ctypes.c_size_t), ctypes.POINTER(ctypes.c_size_t)]
    native = _lib is not None

    def compress(self, data: Any, cuts: Sequence[int] = ()) -> bytes:
        return deflate.deflate_compress(as_u8(data), self.level)

    def decompress_into(self, src: Any, dst: np.ndarray) -> None:
        s = as_u8(src)
        if self._lib is None:
            try:
                out = deflate.deflate_decompress(s, dst.nbytes)
            except Exception as exc:  # the binding raises its own error types
                raise ChunkFormatError(f"deflate payload is corrupt: {exc}") from None
            if len(out) != dst.nbytes:
                raise ChunkFormatError(f"deflate payload inflated to {len(out)} bytes, expected {dst.nbytes}")
            np.copyto(dst, np.frombuffer(out, np.uint8))
            return
        self._native_decoder()(_addr(s), s.nbytes, _addr(dst), dst.nbytes)

    def _native_decoder(self) -> Callable[[int, int, int, int], None]:
        """``decode(src, src_n, dst, dst_n)`` on this thread's decompressor, looked up once."""
        lib = self._lib
        dec = _TLS.get("libdeflate", lib.libdeflate_alloc_decompressor, lib.libdeflate_free_decompressor)
        decompress = lib.libdeflate_deflate_decompress_ex
        used, actual = ctypes.c_size_t(0), ctypes.c_size_t(0)
        used_ref, actual_ref = ctypes.byref(used), ctypes.byref(actual)

        def decode(src: int, src_n: int, dst: int, dst_n: int) -> None:
            # Checking actual_out rejects short streams (result 0 would mean "exact fit" only when it is
            # NULL); checking actual_in rejects bytes after the stream's end, which libdeflate ignores.
            rc = decompress(dec, src, src_n, dst, dst_n, used_ref, actual_ref)
            if rc != 0 or actual.value != dst_n or used.value != src_n:
                raise ChunkFormatError(f"deflate payload is corrupt (libdeflate result {rc}, {actual.value} of "
                                       f"{dst_n} bytes from {used.value} of {src_n})")
        return decode


# Cuts closer than this are merged: a block's header and Huffman table cost up to ~100 bytes.
MIN_CUT_NBYTES = 2048
# A cut is kept only where its block's own table saves more than this many bytes (order-0 estimate). Each
# block costs the decoder 1-2 us (its Huffman table); 512 bytes take as long on a 2-4 Gbit/s link. Measured
# in docs/codec.md, "Which plane starts end a block".
CUT_PRICE_NBYTES = 512


def _spaced(cuts: Sequence[int], nbytes: int) -> list[int]:
    """The cuts inside ``(0, nbytes)`` at least MIN_CUT_NBYTES from the previous kept one and the end."""
    kept, prev = [], 0
    for cut in cuts:
        if cut - prev >= MIN_CUT_NBYTES and nbytes - cut >= MIN_CUT_NBYTES:
            kept.append(cut)
            prev = cut
    return kept


def _code_bits(hist: torch.Tensor) -> float:
    """Order-0 code length, in bits, of bytes with this histogram."""
    h = hist[hist > 0].double()
    return float(-(h * torch.log2(h / h.sum())).sum())


def _paying(data: np.ndarray, cuts: Sequence[int], price: int | None = None) -> list[int]:
    """The ``cuts`` whose block pays for its table: left to right, the bytes up to the next cut join the
    current block unless coding them with their own statistics saves more than ``price`` bytes (None:
    ``CUT_PRICE_NBYTES``, read at the call so a measurement script can vary it)."""
    if not cuts:
        return []
    price = CUT_PRICE_NBYTES if price is None else price
    t = torch.from_numpy(data if data.flags.writeable else data.copy())  # torch warns on read-only arrays
    bounds = [0, *cuts, data.nbytes]
    kept, block = [], torch.bincount(t[: bounds[1]], minlength=256)
    block_bits = _code_bits(block)
    for cut, end in zip(cuts, bounds[2:]):
        hist = torch.bincount(t[cut:end], minlength=256)
        merged, own = block + hist, _code_bits(hist)
        merged_bits = _code_bits(merged)
        if merged_bits - block_bits - own > 8 * price:
            kept.append(cut)
            block, block_bits = hist, own
        else:
            block, block_bits = merged, merged_bits
    return kept


class ZstdStage(LosslessStage):
    """Zstandard frames; the fastest decoder of the three for this data on one core."""

    name = "zstd"
    _lib = _load("zstandard", "_cffi*.so", "zstd", "ZSTD_decompressDCtx")
    if _lib is not None:
        _lib.ZSTD_createDCtx.restype = ctypes.c_void_p
        _lib.ZSTD_freeDCtx.argtypes = [ctypes.c_void_p]
        _lib.ZSTD_decompressDCtx.restype = ctypes.c_size_t
        _lib.ZSTD_decompressDCtx.argtypes = [
            ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t]
        _lib.ZSTD_isError.restype = ctypes.c_uint
        _lib.ZSTD_isError.argtypes = [ctypes.c_size_t]
        _lib.ZSTD_getErrorName.restype = ctypes.c_char_p
        _lib.ZSTD_getErrorName.argtypes = [ctypes.c_size_t]
    native = _lib is not None
    _compressors = threading.local()

    def compress(self, data: Any, cuts: Sequence[int] = ()) -> bytes:
        """One frame. At those of ``cuts`` (at least ``MIN_CUT_NBYTES`` apart) where a table of its own saves
        more than ``CUT_PRICE_NBYTES``, the current block ends, so the next gets its own Huffman table: symbol
        planes whose statistics differ are coded apart, 1.5-4% fewer bytes than 128 KiB blocks that straddle
        planes, and the same decoder (docs/codec.md, "Which plane starts end a block")."""
        cache = self._compressors.__dict__.setdefault("by_level", {})
        comp = cache.get(self.level)
        if comp is None:
            comp = cache[self.level] = zstandard.ZstdCompressor(level=self.level, write_content_size=True)
        data = as_u8(data)
        kept = _paying(data, _spaced(cuts, data.nbytes))
        if not kept:
            return comp.compress(data)
        obj, out, prev = comp.compressobj(size=data.nbytes), [], 0
        for cut in kept:
            out += [obj.compress(data[prev:cut]), obj.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)]
            prev = cut
        out += [obj.compress(data[prev:]), obj.flush()]
        return b"".join(out)

    def decompress_into(self, src: Any, dst: np.ndarray) -> None:
        s = as_u8(src)
        if self._lib is None:
            try:
                out = zstandard.ZstdDecompressor().decompress(s, max_output_size=dst.nbytes)
            except zstandard.ZstdError as exc:
                raise ChunkFormatError(f"zstd payload is corrupt: {exc}") from None
            if len(out) != dst.nbytes:
                raise ChunkFormatError(f"zstd payload decompressed to {len(out)} bytes, expected {dst.nbytes}")
            np.copyto(dst, np.frombuffer(out, np.uint8))
            return
        self._native_decoder()(_addr(s), s.nbytes, _addr(dst), dst.nbytes)

    def _native_decoder(self) -> Callable[[int, int, int, int], None]:
        """``decode(src, src_n, dst, dst_n)`` on this thread's context, looked up once."""
        lib = self._lib
        ctx = _TLS.get("zstd", lib.ZSTD_createDCtx, lib.ZSTD_freeDCtx)
        decompress = lib.ZSTD_decompressDCtx

        def decode(src: int, src_n: int, dst: int, dst_n: int) -> None:
            n = decompress(ctx, dst, dst_n, src, src_n)
            if n != dst_n:  # an error code never equals a size, so isError only on failure
                if lib.ZSTD_isError(n):
                    raise ChunkFormatError(f"zstd payload is corrupt: {lib.ZSTD_getErrorName(n).decode()}")
                raise ChunkFormatError(f"zstd payload decompressed to {n} bytes, expected {dst_n}")
        return decode


class Lz4Stage(LosslessStage):
    """LZ4 block format: fastest to decode, weakest on quantized symbols (no entropy coding)."""

    name = "lz4"
    _lib = _load("lz4.block", "_block*.so", "lz4", "LZ4_decompress_safe")
    if _lib is not None:
        _lib.LZ4_decompress_safe.restype = ctypes.c_int
        _lib.LZ4_decompress_safe.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
    native = _lib is not None

    def compress(self, data: Any, cuts: Sequence[int] = ()) -> bytes:
        mode = "high_compression" if self.level > 0 else "default"
        return lz4.block.compress(as_u8(data), mode=mode, compression=self.level, store_size=False)

    def decompress_into(self, src: Any, dst: np.ndarray) -> None:
        s = as_u8(src)
        if dst.nbytes >= 2**31 or s.nbytes >= 2**31:
            raise ChunkFormatError("lz4 blocks are limited to 2 GiB")
        if self._lib is None:
            try:
                out = lz4.block.decompress(s, uncompressed_size=dst.nbytes)
            except lz4.block.LZ4BlockError as exc:
                raise ChunkFormatError(f"lz4 payload is corrupt: {exc}") from None
            if len(out) != dst.nbytes:
                raise ChunkFormatError(f"lz4 payload decompressed to {len(out)} bytes, expected {dst.nbytes}")
            np.copyto(dst, np.frombuffer(out, np.uint8))
            return
        self._native_decoder()(_addr(s), s.nbytes, _addr(dst), dst.nbytes)

    def _native_decoder(self) -> Callable[[int, int, int, int], None]:
        """``decode(src, src_n, dst, dst_n)`` through LZ4's context-free decoder."""
        decompress = self._lib.LZ4_decompress_safe

        def decode(src: int, src_n: int, dst: int, dst_n: int) -> None:
            n = decompress(src, dst, src_n, dst_n)
            if n != dst_n:
                raise ChunkFormatError(f"lz4 payload is corrupt (decoder returned {n}, expected {dst_n} bytes)")
        return decode


_STAGES: dict[str, type[LosslessStage]] = {
    "none": LosslessStage,
    "deflate": DeflateStage,
    "zstd": ZstdStage,
    "lz4": Lz4Stage,
}


def make_stage(name: str, level: int = 0) -> LosslessStage:
    """Build the lossless stage called ``name`` (see ``LOSSLESS_STAGES``)."""
    if name not in _STAGES:
        raise ConfigError(f"unknown lossless stage {name!r}: choose one of {', '.join(LOSSLESS_STAGES)}")
    return _STAGES[name](level)
