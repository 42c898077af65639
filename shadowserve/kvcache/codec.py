"""KVCodec: quantize + lossless-compress KV chunks into checked containers, and back.

Decoding is split in the two halves the data-plane pipeline runs as separate stages:

* ``decompress_into(blob, staging)`` verifies the container and inflates the payload (fp16 scales
  followed by the symbols, one or two per byte, or the raw KV for ``quant="none"``) into a
  caller-owned staging buffer;
* ``dequantize_into(header, staging, out)`` turns the staging bytes into KV in the caller's tensor.

Both allocate nothing per chunk once warm (per-thread decompressor contexts and fp32 scratch, the
caller's buffers for everything else) and spend their time in C code that releases the GIL.
``decode`` chains the two through a per-thread staging buffer for callers without a pipeline.
"""

from __future__ import annotations

import hashlib
import threading
import warnings
from typing import Any

import numpy as np
import torch

from shadowserve.config import CodecConfig
from shadowserve.errors import ChunkFormatError
from shadowserve.kvcache import blocks, packing
from shadowserve.kvcache import format as fmt
from shadowserve.kvcache import quant as q
from shadowserve.kvcache.channel_steps import format_tag, plane_multipliers
from shadowserve.kvcache.layout import Layout
from shadowserve.kvcache.lossless import as_u8, make_stage
from shadowserve.kvcache.plan import plan
from shadowserve.kvcache.schedules import is_named, step_multipliers

_ELEMENT_SIZE = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2}


def kv_format_id_of(config: CodecConfig) -> str:
    """A stable name for what a chunk decodes to: staging layout version, quantizer and its parameters.

    It seeds the chunk keys. The lossless stage, its level and its blocking are left out (and so is
    the container version, which only says whether the payload is blocked): they change the bytes on
    the wire, never the decoded KV, so chunks saved with zstd, deflate, lz4 or none, blocked or not,
    are the same cache entry, and any decoder of this format reads them all.
    """
    if config.quant == "rms":
        qpart = f"rms:k{config.key_step:g}:v{config.value_step:g}"
        if multipliers := step_multipliers(config):
            schedule = ",".join(f"{m:g}" for m in multipliers)
            qpart += f":L{hashlib.sha256(schedule.encode()).hexdigest()[:12]}"
        qpart += format_tag(config)
    elif config.quant in ("uniform", "kivi"):
        qpart = f"{config.quant}:b{config.bins}"
    else:
        qpart = config.quant
    version = fmt.RAW_KV_FORMAT_VERSION if config.quant == "none" else fmt.KV_FORMAT_VERSION
    return f"sskv{version}/{qpart}"


def codec_id_of(config: CodecConfig) -> str:
    """What a chunk's header names: its KV format and the lossless stage its payload went through (a
    chunk that skipped the configured stage names ``none`` instead: ``KVCodec.encode``)."""
    return f"{kv_format_id_of(config)}/{config.lossless}"


class KVCodec:
    """Encoder/decoder for one (codec config, model) pair. Thread-safe; share one per process."""

    def __init__(self, config: CodecConfig, model_fingerprint: str) -> None:
        if not isinstance(model_fingerprint, str) or not model_fingerprint:
            raise ValueError("model_fingerprint must be a non-empty string")
        self.config = config
        self.model_fingerprint = model_fingerprint
        self.codec_id = codec_id_of(config)
        self.kv_format_id = kv_format_id_of(config)
        self.lossless = make_stage(config.lossless, config.level)
        # Decoders for chunks saved through another lossless stage (same KV format), made on first use.
        self._stages = {config.lossless: self.lossless}
        self.lossy = config.quant != "none"
        self._layouts: dict[tuple[int, int, int], Layout] = {}
        self._lock = threading.Lock()
        self._tls = threading.local()

    def __repr__(self) -> str:
        return f"KVCodec({self.codec_id!r}, model={self.model_fingerprint!r})"

    # ---- sizes -------------------------------------------------------------------------------

    def _layout(self, shape: tuple[int, ...]) -> Layout:
        layers, _, tokens, heads, head_dim = shape
        key = (layers, tokens, heads * head_dim)
        layout = self._layouts.get(key)
        if layout is None:
            c = self.config
            rules = plan(c.quant, layers, c.bins, c.key_step, c.value_step, step_multipliers(c),
                         adapt=is_named(c))
            layout = Layout(rules, tokens, heads * head_dim, *plane_multipliers(c, layers, heads, head_dim))
            with self._lock:
                self._layouts[key] = layout
        return layout

    def layout_of(self, shape: tuple[int, ...]) -> Layout:
        """Where a lossy chunk's scales and symbols sit in its staging bytes (for device-side decoders)."""
        return self._layout(_check_shape(tuple(shape)))

    def staging_nbytes(self, shape: tuple[int, ...], dtype: torch.dtype) -> int:
        """The most staging bytes a chunk of this shape and dtype can need (lossy chunks with
        symbols two per byte need less; their header says how much)."""
        shape = _check_shape(shape)
        if not self.lossy:
            return int(np.prod(shape)) * _ELEMENT_SIZE[dtype]
        return self._layout(shape).staging_nbytes

    def max_staging_nbytes(self, shape: tuple[int, ...]) -> int:
        """Largest staging size of a chunk of ``shape`` in any dtype: allocate staging slots once with it."""
        return max(self.staging_nbytes(shape, dt) for dt in _ELEMENT_SIZE)

    def max_encoded_nbytes(self, shape: tuple[int, ...]) -> int:
        """A safe upper bound on the size of an encoded chunk of ``shape`` (for receive buffers)."""
        raw = self.max_staging_nbytes(shape)
        # Every stage's worst case on incompressible input is within 1/128 + 1 KiB of the input size;
        # a blocked payload (from any saver's block size) adds its table and per-block framing.
        return (fmt.header_nbytes(self.codec_id, self.model_fingerprint) + raw + raw // 128 + 1024
                + blocks.max_overhead_nbytes(raw))

    # ---- encode ------------------------------------------------------------------------------

    def encode(self, kv: torch.Tensor) -> bytes:
        """Encode one chunk ``[layers, 2, tokens, kv_heads, head_dim]`` (fp32/fp16/bf16) into a container.

        The save path: allocates its output (and, for lossy modes, chunk-sized temporaries).
        """
        if not isinstance(kv, torch.Tensor):
            raise TypeError("kv must be a torch.Tensor")
        shape = _check_shape(tuple(kv.shape))
        if kv.dtype not in _ELEMENT_SIZE:
            raise ValueError(f"kv dtype must be float32, float16 or bfloat16, got {kv.dtype}")
        kv = kv.detach()
        if kv.device.type != "cpu":
            kv = kv.cpu()
        cuts: list[int] = []  # raw KV: one plane's bytes look like the next's
        if not self.lossy:
            staging = kv.contiguous().view(-1).view(torch.uint8).numpy()
        else:
            layout = self._layout(shape)
            staging = np.zeros(layout.staging_nbytes, dtype=np.uint8)
            scales, symbols = packing.split_staging(layout, _tensor_u8(staging), layout.staging_nbytes)
            x = kv.float().reshape(shape[0], 2, shape[2], shape[3] * shape[4])
            q.quantize(x, layout, scales, symbols)
            packed = packing.pack_staging(layout, staging, self.config.key_offsets) if self.config.pack_nibbles else None
            if packed is not None:
                staging = packed
            cuts = packing.plane_starts(layout, staging)
        staging = as_u8(staging)
        blocked = bool(self.config.lossless_block) and self.config.lossless != "none"
        if blocked:
            payload = blocks.compress(self.lossless, staging, self.config.lossless_block, cuts)
        else:
            payload = self.lossless.compress(staging, cuts)
        codec_id = self.codec_id
        skip_below = self.config.min_saving  # 0: keep the stage whatever it saves
        if skip_below and self.config.lossless != "none" and len(payload) > staging.nbytes * (1 - skip_below):
            # The stage would cost every fetch a decompress for too few bytes saved: store it raw.
            payload, codec_id = self._stage("none").compress(staging), f"{self.kv_format_id}/none"
            blocked = False
        return fmt.pack(shape, kv.dtype, codec_id, self.model_fingerprint, staging.nbytes, payload, blocked)

    # ---- decode ------------------------------------------------------------------------------

    def read_header(self, blob: Any) -> fmt.ChunkHeader:
        """Verify a chunk (header and payload checksums, codec, model) without decompressing it."""
        return fmt.parse(blob, self.kv_format_id, self.model_fingerprint)[0]

    def decompress_into(self, blob: Any, staging: Any) -> fmt.ChunkHeader:
        """Hot path, stage 1: verify ``blob`` and inflate its payload into ``staging``.

        ``staging`` is any writable buffer of at least ``header.staging_nbytes`` bytes (a numpy uint8
        array, a shared-memory slot...); reuse it. Raises ChunkFormatError for any corrupt, truncated,
        foreign or mis-versioned chunk. Allocates nothing of the chunk's size.
        """
        header, payload = fmt.parse(blob, self.kv_format_id, self.model_fingerprint)
        self._decompress(header, payload, as_u8(staging, writable=True))
        return header

    def _decompress(self, header: fmt.ChunkHeader, payload: np.ndarray, dst: np.ndarray) -> None:
        expected = header.staging_nbytes
        if self.lossy:
            self._layout(header.shape).check_staging_nbytes(expected)  # a size a symbol layout can have
        elif expected != self.staging_nbytes(header.shape, header.dtype):
            raise ChunkFormatError(
                f"chunk claims {expected} staging bytes, its shape implies "
                f"{self.staging_nbytes(header.shape, header.dtype)}")
        if dst.nbytes < expected:
            raise ValueError(f"staging buffer holds {dst.nbytes} bytes, this chunk needs {expected}")
        if header.blocked:
            blocks.decompress_into(self._stage(header.lossless), payload, dst[:expected])
        else:
            self._stage(header.lossless).decompress_into(payload, dst[:expected])

    def lossless_blocks(self, blob: Any) -> list[blocks.Block]:
        """Verify a chunk and list its independently decodable lossless blocks, offsets from the start
        of ``blob``: (compressed offset, compressed bytes, staging offset, staging bytes) per block, what
        a GPU batched decompressor takes as its input and output arrays (the stage is the header's
        ``lossless``). A version-2 chunk is one block, its whole payload; a ``none`` chunk's one block is
        the staging bytes themselves."""
        header, payload = fmt.parse(blob, self.kv_format_id, self.model_fingerprint)
        h, n = header.header_nbytes, header.staging_nbytes
        if not header.blocked:
            return [blocks.Block(h, header.payload_nbytes, 0, n)]
        return [b._replace(comp_offset=b.comp_offset + h) for b in blocks.table(payload, n)]

    def _stage(self, name: str):
        stage = self._stages.get(name)
        if stage is None:
            with self._lock:
                stage = self._stages.setdefault(name, make_stage(name, 0))
        return stage

    def dequantize_into(self, header: fmt.ChunkHeader, staging: Any, out: torch.Tensor) -> torch.Tensor:
        """Hot path, stage 2: write the KV held in ``staging`` into ``out`` and return ``out``.

        ``out`` is a CPU float tensor of exactly ``header.shape`` (any float dtype; a lossless codec
        is bit-exact when it matches the chunk's dtype). Allocates nothing once warm.
        """
        if not isinstance(out, torch.Tensor) or not out.is_floating_point():
            raise ValueError("out must be a floating-point torch.Tensor")
        if tuple(out.shape) != header.shape:
            raise ChunkFormatError(
                f"chunk holds KV of shape {list(header.shape)}, destination tensor has shape {list(out.shape)}")
        if out.device.type != "cpu":
            raise ValueError("out must be a CPU tensor")
        src = as_u8(staging)
        n = header.staging_nbytes
        if src.nbytes < n:
            raise ValueError(f"staging buffer holds {src.nbytes} bytes, this chunk needs {n}")
        if not self.lossy:
            raw = _tensor_u8(src[:n]).view(header.dtype).view(header.shape)
            out.copy_(raw)
            return out
        layout = self._layout(header.shape)
        scales, symbols = packing.split_staging(layout, _tensor_u8(src[:n]), n)
        q.dequantize_into(layout, scales, symbols, out)
        return out

    def decode(self, blob: Any, out: torch.Tensor) -> torch.Tensor:
        """Verify and decode a chunk into ``out`` (see the two halves); reuses a per-thread staging buffer."""
        header, payload = fmt.parse(blob, self.kv_format_id, self.model_fingerprint)
        if tuple(out.shape) != header.shape:
            raise ChunkFormatError(
                f"chunk holds KV of shape {list(header.shape)}, destination tensor has shape {list(out.shape)}")
        staging = getattr(self._tls, "staging", None)
        if staging is None or staging.nbytes < header.staging_nbytes:
            staging = self._tls.staging = np.empty(max(header.staging_nbytes, 1), dtype=np.uint8)
        self._decompress(header, payload, staging)
        return self.dequantize_into(header, staging, out)

    # ---- helpers -----------------------------------------------------------------------------

    def error_bound(self, header: fmt.ChunkHeader, staging: Any) -> torch.Tensor:
        """Per-value error bound ``s/2`` [layers, 2, tokens, channels] of a decompressed lossy chunk."""
        if not self.lossy:
            raise ValueError("a lossless codec has no quantization error")
        layout = self._layout(header.shape)
        scales, _ = packing.split_staging(layout, _tensor_u8(as_u8(staging)[: header.staging_nbytes]), header.staging_nbytes)
        return q.error_bound(layout, scales)


def _tensor_u8(arr: np.ndarray) -> torch.Tensor:
    """A uint8 tensor sharing ``arr``'s memory (read-only buffers are only ever read)."""
    if not arr.flags.writeable:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(arr)
    return torch.from_numpy(arr)


def _check_shape(shape: tuple[int, ...]) -> tuple[int, int, int, int, int]:
    if len(shape) != 5 or shape[1] != 2 or min(shape) < 1:
        raise ValueError(f"KV chunk shape must be [layers, 2, tokens, kv_heads, head_dim], got {list(shape)}")
    return tuple(int(s) for s in shape)  # type: ignore[return-value]
