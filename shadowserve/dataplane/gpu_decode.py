"""The ``gpu`` fetch mode's decode stage (the CacheGen-Async baseline): dequantize on the serving GPU.

Fetch and lossless decompression run on host threads as in every mode; then the chunk's symbols
and scales are copied to the GPU and turned into KV by torch kernels on a side stream, writing
straight into the destination blocks. Those kernels share the SMs with the engine's decode: that
contention is what this baseline exists to show next to ``offload``, whose data plane only ever
uses the copy engines.

Device buffers (one per staging slot) and per-thread streams and scratch are made once; a chunk
allocates nothing.
"""

from __future__ import annotations

import threading

import torch

from shadowserve.dataplane.kv_targets import ChunkPlan, CudaEngineKV
from shadowserve.kvcache import format as fmt
from shadowserve.kvcache.packing import PackedSymbols, split_staging, unpack_into
from shadowserve.kvcache.plan import TOKEN


class GpuDequantizer:
    def __init__(self, codec, target: CudaEngineKV, staging_slots: int, staging_bytes: int) -> None:
        self.codec, self.target = codec, target
        self.device = target.device
        # Where the staging bytes land on the device: indexed by the host staging slot they came from.
        self._dev_staging = torch.empty((staging_slots, staging_bytes), dtype=torch.uint8, device=self.device)
        self._tls = threading.local()

    def _thread_state(self) -> tuple[torch.cuda.Stream, torch.cuda.Event, torch.Tensor]:
        tls = self._tls
        if getattr(tls, "stream", None) is None:
            tls.stream = torch.cuda.Stream(device=self.device)
            tls.event = torch.cuda.Event()
            # A chunk-shaped device scratch for destinations that are not one contiguous run.
            tls.scratch = torch.empty(self.target.chunk_shape, dtype=self.target.dtype, device=self.device)
            # Where symbols stored two per byte are unpacked, one int8 each.
            tls.unpacked = torch.empty(tls.scratch.numel(), dtype=torch.int8, device=self.device)
        return tls.stream, tls.event, tls.scratch, tls.unpacked

    def dequantize(self, header: fmt.ChunkHeader, staging: torch.Tensor, slot: int, plan: ChunkPlan) -> None:
        """Hot path: pinned staging bytes -> device -> KV in the destination blocks; returns when landed."""
        stream, event, scratch, unpacked = self._thread_state()
        n = header.staging_nbytes
        packing = None
        if self.codec.lossy:
            layout = self.codec.layout_of(header.shape)
            # Checks the symbol table and escape positions on the host, before any kernel.
            _, host_symbols = split_staging(layout, staging[:n], n)
            packing = host_symbols.packing if isinstance(host_symbols, PackedSymbols) else None
        dev = self._dev_staging[slot]
        with torch.cuda.stream(stream):
            dev[:n].copy_(staging[:n], non_blocking=True)
            if plan.run_start is not None:
                first = plan.run_start
                out = self.target.pool_view(first)
            else:
                out = scratch
            if not self.codec.lossy:
                out.copy_(dev[:n].view(header.dtype).view(header.shape))
            else:
                scales, symbols = split_staging(layout, dev[:n], n, check=False, packing=packing)
                _dequantize_on_device(layout, scales, symbols, out, unpacked, self._step_state(layout))
            if out is scratch:
                self.target.scatter_on_device(plan, scratch)
            event.record(stream)
        event.synchronize()

    def _step_state(self, layout) -> tuple[torch.Tensor, torch.Tensor] | None:
        """This thread's device copy of the channels' step multipliers and an fp32 chunk scratch, made on
        first use (None when the codec has one step per row)."""
        if layout.steps is None:
            return None
        tls = self._tls
        if getattr(tls, "steps", None) is None:
            tls.steps = layout.steps.to(self.device)
            tls.product = torch.empty(self.target.chunk_shape, dtype=torch.float32, device=self.device)
        return tls.steps, tls.product

    def close(self) -> None:
        self._dev_staging = None


def _dequantize_on_device(layout, scales16: torch.Tensor, symbols: torch.Tensor | PackedSymbols,
                          out: torch.Tensor, unpacked: torch.Tensor,
                          step_state: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    """``out = symbols * scales`` with the same rounding as the host path (product in fp32, one cast).

    Packed symbols are first unpacked into ``unpacked`` (int8, at least the chunk's size). With
    per-channel steps, ``step_state`` holds the multipliers [layers, 2, channels] on the device and an
    fp32 scratch of the chunk's shape: values are ``(symbols * scales) * multipliers`` in fp32, as on the
    host (a multiplier of 1 changes nothing), then cast once. Plain torch ops, so it runs on any device
    (the tests check it on the CPU against the host decoder).
    """
    layers = len(layout.rules)
    if isinstance(symbols, PackedSymbols):
        flat = unpacked[: layout.symbols_nbytes]
        unpack_into(symbols, flat)
        symbols = flat
    t = layout.tokens
    heads, head_dim = out.shape[3], out.shape[4]
    sym = symbols.view(layers, 2, t, heads, head_dim)
    if layout.token_only:
        per_token = scales16.view(layers, 2, t, 1, 1)
        if step_state is None:
            out.copy_(sym)  # int8 values are exact in every float dtype
            out.mul_(per_token)
            return
        steps, product = step_state
        product.copy_(sym).mul_(per_token).mul_(steps.view(layers, 2, 1, heads, head_dim))
        out.copy_(product)
        return
    out.copy_(sym)
    for layer in range(layers):
        for kv in range(2):
            s = layout.scale_view(scales16, layer, kv)
            per_token = layout.rules[layer][kv].axis == TOKEN
            out[layer, kv].mul_(s.view(t, 1, 1) if per_token else s.view(1, heads, head_dim))
