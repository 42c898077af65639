"""Where the pipeline's chunks land: one adapter per paged-KV memory layout.

A stored chunk is always ``[layers, 2 (K,V), tokens, kv_heads, head_dim]`` (DESIGN §3), whatever
engine made it. Engines page their KV differently, so the pipeline talks to a *target* that knows
one layout: ``plan`` turns a chunk's destination block ids into what the hot path needs (at submit,
off the hot path), ``direct_view`` gives a chunk-shaped view of the destination when the codec can
dequantize straight into it, and ``scatter``/``gather`` copy a chunk into / out of its blocks.

* ``engine``: ours, ``[layers, 2, blocks, block_size, kv_heads, head_dim]`` (engine/kv_pool.py).
* ``head_major``: vLLM's CPU layout (LBHNC), ``[layers, blocks, kv_heads, 2, block_size, head_dim]``:
  each block of each head holds its ``block_size`` keys, then its ``block_size`` values.
* ours in GPU memory (``CudaEngineKV``): chunks are dequantized on the host into pinned slots and
  land by DMA copies on the data plane's own stream, so the serving GPU's SMs never run our code.

A block id of ``-1`` in a plan means "already there, leave it alone" (a chunk that is partly held
locally by the engine): only the other blocks are written.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from shadowserve.dataplane.cuda_copy import load_copy_2d

KV_LAYOUTS = ("engine", "head_major")


@dataclass(frozen=True)
class ChunkPlan:
    blocks: torch.Tensor  # destination block ids, one per block of the chunk (-1: skip)
    run_start: int | None  # first block when all blocks are one contiguous run (none skipped)
    pairs: tuple[tuple[int, int], ...]  # (position in chunk, block id) of the blocks to write
    runs: tuple[tuple[int, int, int], ...] = ()  # (position, first block, count): contiguous stretches


def _plan(blocks: tuple[int, ...]) -> ChunkPlan:
    contiguous = blocks[0] >= 0 and all(b - a == 1 for a, b in zip(blocks, blocks[1:]))
    pairs = tuple((i, b) for i, b in enumerate(blocks) if b >= 0)
    runs: list[list[int]] = []
    for i, b in pairs:
        if runs and runs[-1][0] + runs[-1][2] == i and runs[-1][1] + runs[-1][2] == b:
            runs[-1][2] += 1
        else:
            runs.append([i, b, 1])
    return ChunkPlan(torch.tensor(blocks, dtype=torch.long), blocks[0] if contiguous else None, pairs,
                     tuple(tuple(r) for r in runs))


class EngineKV:
    """Our engine's pool: a chunk's blocks are one strided view, so contiguous runs take no copy."""

    def __init__(self, pool: torch.Tensor, chunk_size: int) -> None:
        layers, _, num_blocks, block_size, kv_heads, head_dim = pool.shape
        self.blocks_per_chunk = chunk_size // block_size
        self.chunk_shape = (layers, 2, chunk_size, kv_heads, head_dim)
        self.dtype = pool.dtype
        self._pool = pool
        # [layers*2, blocks, block elems]: one index_copy_ along dim 1 scatters a whole chunk.
        self._rows = pool.view(layers * 2, num_blocks, -1)

    plan = staticmethod(_plan)

    def direct_view(self, plan: ChunkPlan) -> torch.Tensor | None:
        if plan.run_start is None:
            return None
        first = plan.run_start
        return self._pool[:, :, first : first + self.blocks_per_chunk].view(self.chunk_shape)

    def scatter(self, plan: ChunkPlan, src: torch.Tensor) -> None:
        """Hot path: one copy of the chunk into its destination KV blocks."""
        rows = src.view(self._rows.shape[0], self.blocks_per_chunk, -1)
        if len(plan.pairs) == self.blocks_per_chunk:
            self._rows.index_copy_(1, plan.blocks, rows)
        else:
            for i, b in plan.pairs:
                self._rows[:, b].copy_(rows[:, i])

    def gather(self, plan: ChunkPlan, out: torch.Tensor) -> None:
        """Copy the chunk's blocks into ``out`` (chunk-shaped) for the save path."""
        torch.index_select(self._rows, 1, plan.blocks, out=out.view(self._rows.shape[0], self.blocks_per_chunk, -1))

    def close(self) -> None:
        self._pool = self._rows = None


class HeadMajorKV:
    """vLLM's CPU layout: tokens of a block are contiguous per head, keys before values.

    No chunk-shaped view of the destination exists, so chunks go through a kv slot and one
    permuting copy per block (or per contiguous run).
    """

    def __init__(self, pool: torch.Tensor, chunk_size: int) -> None:
        layers, _, kv_heads, _, block_size, head_dim = pool.shape
        self.blocks_per_chunk = chunk_size // block_size
        self.chunk_shape = (layers, 2, chunk_size, kv_heads, head_dim)
        self.dtype = pool.dtype
        self._pool = pool
        self._block_split = (layers, 2, self.blocks_per_chunk, block_size, kv_heads, head_dim)

    plan = staticmethod(_plan)

    def direct_view(self, plan: ChunkPlan) -> torch.Tensor | None:
        return None

    def _as_blocks(self, chunk: torch.Tensor) -> torch.Tensor:
        # [L, 2, n, bs, H, D] -> [L, n, H, 2, bs, D]: the pool's order, as a view (no copy).
        return chunk.view(self._block_split).permute(0, 2, 4, 1, 3, 5)

    def scatter(self, plan: ChunkPlan, src: torch.Tensor) -> None:
        """Hot path: a permuting copy of the chunk into its blocks (one per contiguous run)."""
        blocks = self._as_blocks(src)
        if plan.run_start is not None:
            self._pool[:, plan.run_start : plan.run_start + self.blocks_per_chunk].copy_(blocks)
            return
        for i, b in plan.pairs:
            self._pool[:, b].copy_(blocks[:, i])

    def gather(self, plan: ChunkPlan, out: torch.Tensor) -> None:
        blocks = self._as_blocks(out)
        for i, b in plan.pairs:
            blocks[:, i].copy_(self._pool[:, b])

    def close(self) -> None:
        self._pool = None


class CudaEngineKV:
    """Our engine's pool in GPU memory, written by the copy engines only.

    A chunk arrives in a pinned host slot; ``scatter`` issues one pitched host-to-device copy per
    contiguous run of destination blocks (cuda_copy.py; or one per (layer, K/V) plane without
    cuda-bindings) on this thread's own lowest-priority stream, and returns only when it is done,
    so a completion always means "the KV is there". No kernel runs on the serving GPU. ``gather``
    is the same in reverse, for the save path.
    """

    needs_pinned = True

    def __init__(self, pool: torch.Tensor, chunk_size: int) -> None:
        layers, _, num_blocks, block_size, kv_heads, head_dim = pool.shape
        self.blocks_per_chunk = chunk_size // block_size
        self.chunk_shape = (layers, 2, chunk_size, kv_heads, head_dim)
        self.dtype = pool.dtype
        self.device = pool.device
        self._pool = pool
        self._rows = pool.view(layers * 2, num_blocks, -1)
        self._tls = threading.local()
        self.copy_2d = load_copy_2d()  # one call per run of blocks; None: one torch copy per plane

    plan = staticmethod(_plan)

    def direct_view(self, plan: ChunkPlan) -> torch.Tensor | None:
        return None  # the host never writes device memory directly: always through a pinned slot

    def stream_and_event(self) -> tuple[torch.cuda.Stream, torch.cuda.Event]:
        """This thread's copy stream (lowest priority) and its completion event, made once per thread."""
        tls = self._tls
        if getattr(tls, "stream", None) is None:
            low = torch.cuda.Stream(device=self.device, priority=0)  # 0 is CUDA's lowest priority
            tls.stream, tls.event = low, torch.cuda.Event()
        return tls.stream, tls.event

    def _copy_runs(self, plan: ChunkPlan, chunk: torch.Tensor, to_device: bool) -> None:
        rows = chunk.view(self._rows.shape[0], self.blocks_per_chunk, -1)
        stream, event = self.stream_and_event()
        with torch.cuda.stream(stream):
            for i, b, n in plan.runs:
                if self.copy_2d is not None:
                    dev, host = self._rows[:, b : b + n], rows[:, i : i + n]
                    if to_device:
                        self.copy_2d(dev, host, stream)
                    else:
                        self.copy_2d(host, dev, stream)
                    continue
                for r in range(rows.shape[0]):
                    if to_device:
                        self._rows[r, b : b + n].copy_(rows[r, i : i + n], non_blocking=True)
                    else:
                        rows[r, i : i + n].copy_(self._rows[r, b : b + n], non_blocking=True)
            event.record(stream)
        event.synchronize()

    def scatter(self, plan: ChunkPlan, src: torch.Tensor) -> None:
        """Hot path: DMA the chunk from its pinned slot into its destination blocks; returns when landed."""
        self._copy_runs(plan, src, to_device=True)

    def gather(self, plan: ChunkPlan, out: torch.Tensor) -> None:
        """Copy the chunk's blocks into the pinned chunk ``out`` (the save path); returns when done."""
        self._copy_runs(plan, out, to_device=False)

    def pool_view(self, first_block: int) -> torch.Tensor:
        """A chunk-shaped view of a contiguous run of blocks (the ``gpu`` mode's kernels write it)."""
        return self._pool[:, :, first_block : first_block + self.blocks_per_chunk].view(self.chunk_shape)

    def scatter_on_device(self, plan: ChunkPlan, src: torch.Tensor) -> None:
        """Device-to-device copies of a chunk already on the GPU (``gpu`` mode), on the current stream."""
        rows = src.view(self._rows.shape[0], self.blocks_per_chunk, -1)
        for i, b, n in plan.runs:
            self._rows[:, b : b + n].copy_(rows[:, i : i + n])

    def close(self) -> None:
        self._pool = self._rows = None


def kv_target(pool: torch.Tensor, chunk_size: int, layout: str = "engine") -> EngineKV | HeadMajorKV | CudaEngineKV:
    """The adapter for ``pool`` in ``layout`` (one of ``KV_LAYOUTS``)."""
    if layout == "engine" and pool.device.type == "cuda":
        return CudaEngineKV(pool, chunk_size)
    if layout == "engine":
        return EngineKV(pool, chunk_size)
    if layout == "head_major":
        if pool.device.type != "cpu":
            raise ValueError("the head_major layout (vLLM's CPU KV cache) is supported on the CPU only")
        return HeadMajorKV(pool, chunk_size)
    raise ValueError(f"unknown KV layout {layout!r}: choose one of {', '.join(KV_LAYOUTS)}")
