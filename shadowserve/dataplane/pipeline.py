"""The chunked pipeline: fetch -> decompress -> dequantize -> scatter (and the save path).

Each stage is a small pool of threads (the store client, the lossless codecs and torch release the
GIL), fed by a queue. A chunk moves through fixed slots: network bytes land in a *receive* slot,
decompressed symbols in a *staging* slot, dequantized KV in a *kv* slot, and the scatter stage
copies that into the engine's destination blocks. So stage i of chunk n overlaps stage i+1 of
chunk n-1, and memory in flight is bounded by the slot counts (back-pressure, never growth).

The same class runs inline (``sync``), on engine-process threads (``thread``) or inside the isolated
data-plane process (``offload``); only where it runs differs.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from shadowserve.config import DataPlaneConfig
from shadowserve.dataplane.buffers import SlotPool
from shadowserve.dataplane.gpu_decode import GpuDequantizer
from shadowserve.dataplane.kv_targets import ChunkPlan, kv_target
from shadowserve.dataplane.local_tier import LocalTier
from shadowserve.dataplane.messages import Completion, FetchCommand, SaveCommand
from shadowserve.errors import ChunkFormatError, ConfigError, ShadowServeError, StoreError, StoreUnavailable

STAGES = ("fetch", "decompress", "dequantize", "scatter", "save")


@dataclass(frozen=True)
class BufferLayout:
    """Slot sizes and shared-memory names; the engine side creates the segments once."""

    receive_bytes: int
    staging_bytes: int
    kv_bytes: int
    receive_shm: str | None = None
    staging_shm: str | None = None
    kv_shm: str | None = None


@dataclass
class _Job:
    command: FetchCommand | SaveCommand
    kind: str
    on_done: Callable[[Completion], None]
    start: float = field(default_factory=time.perf_counter)
    results: list[bool | None] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    error_kinds: dict[str, int] = field(default_factory=dict)
    nbytes: int = 0
    first_failure: int = 1 << 30  # chunks after a failed one are skipped: only a prefix is usable
    lock: threading.Lock = field(default_factory=threading.Lock)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    tier_chunks: int = 0
    tier_bytes: int = 0
    store_bytes: int = 0
    store_span: list[float] = field(default_factory=lambda: [float("inf"), 0.0])  # first read start, last end


@dataclass
class _Chunk:
    job: _Job
    index: int
    key: bytes
    plan: ChunkPlan  # destination blocks, prepared at submit by the KV target
    recv: int = -1
    nbytes: int = 0
    staging: int = -1
    header: object = None
    kv: int = -1
    from_tier: bool = False  # its bytes came from the local tier
    skip_tier: bool = False  # its tier copy failed verification: read the store


class Pipeline:
    """Runs fetch and save jobs over fixed buffers, writing KV straight into ``kv_tensor`` blocks."""

    def __init__(
        self,
        config: DataPlaneConfig,
        store,
        codec,
        kv_tensor: torch.Tensor,
        layout: BufferLayout,
        on_thread_start: Callable[[], None] | None = None,
        kv_layout: str = "engine",
        tier: LocalTier | None = None,
    ) -> None:
        self.config, self.store, self.codec = config, store, codec
        self.tier = tier  # the local compressed tier, consulted before the store (None: off)
        # The layout adapter: our engine's pool, or another engine's (kv_targets.py).
        self._target = kv_target(kv_tensor, config.chunk_size, kv_layout)
        self.blocks_per_chunk = self._target.blocks_per_chunk
        self.chunk_shape = self._target.chunk_shape
        self._on_thread_start = on_thread_start
        # A GPU pool is fed by DMA from pinned slots (kv_targets.CudaEngineKV); the ``gpu`` mode also
        # copies staging bytes to the device for its kernels (gpu_decode.py).
        to_gpu = getattr(self._target, "needs_pinned", False)
        gpu_decode = config.fetch_mode == "gpu"
        if gpu_decode and not to_gpu:
            raise ConfigError("the gpu fetch mode needs the KV pool in GPU memory (--device cuda)")
        self.receive = SlotPool("receive", config.receive_slots, layout.receive_bytes, layout.receive_shm)
        self.staging = (SlotPool("staging", config.staging_slots, layout.staging_bytes, pinned=True) if gpu_decode
                        else SlotPool("staging", config.staging_slots, layout.staging_bytes, layout.staging_shm))
        self.kvslots = (SlotPool("kv", config.kv_slots, layout.kv_bytes, pinned=True) if to_gpu
                        else SlotPool("kv", config.kv_slots, layout.kv_bytes, layout.kv_shm))
        self._gpu = None
        if gpu_decode:
            self._gpu = GpuDequantizer(codec, self._target, self.staging.num_slots, self.staging.slot_bytes)
        numel = int(np.prod(self.chunk_shape))
        # Tensor views over the kv slots, made once: the hot path never creates tensors for buffers.
        self._kv_views = [
            self.kvslots.tensor(i).view(self._target.dtype)[:numel].view(self.chunk_shape)
            for i in range(self.kvslots.num_slots)
        ]
        self._staging_tensors = [self.staging.tensor(i) for i in range(self.staging.num_slots)] if gpu_decode else []
        self._busy = dict.fromkeys(STAGES, 0.0)
        self._chunks = dict.fromkeys(STAGES, 0)  # chunks each stage finished (ok or not)
        self._fetched_bytes = 0
        self._busy_lock = threading.Lock()
        self._started = time.perf_counter()
        self._queues = {s: queue.Queue() for s in STAGES}
        self._tls = threading.local()
        self._threads: list[threading.Thread] = []
        self._closed = False
        for stage, n in config.stage_workers().items():
            for i in range(n):
                t = threading.Thread(target=self._worker, args=(stage,), name=f"dp-{stage}-{i}", daemon=True)
                t.start()
                self._threads.append(t)

    # ---- submission ---------------------------------------------------------------------------

    def submit(self, command: FetchCommand | SaveCommand, on_done: Callable[[Completion], None]) -> None:
        """Queue a job; ``on_done`` is called once, from a pipeline thread, when every chunk is settled."""
        kind = "fetch" if isinstance(command, FetchCommand) else "save"
        job = _Job(command, kind, on_done, results=[None] * len(command.keys))
        if not command.keys:
            self._finish(job)
            return
        for i, (key, blocks) in enumerate(zip(command.keys, command.block_ids)):
            chunk = _Chunk(job, i, key, self._target.plan(blocks))  # decided here, off the hot path
            self._queues["fetch" if kind == "fetch" else "save"].put(chunk)

    # ---- stages -------------------------------------------------------------------------------

    def _worker(self, stage: str) -> None:
        if self._on_thread_start:
            self._on_thread_start()
        step = getattr(self, f"_{stage}")
        inbox = self._queues[stage]
        # Jobs this thread settled: their completion goes out only after the step's accounting, so
        # whoever wakes on it reads stats that already include the chunk.
        finished = self._tls.finished = []
        while True:
            chunk = inbox.get()
            if chunk is None:
                return
            nxt = self._run(stage, step, chunk)
            for job in finished:
                self._finish(job)
            finished.clear()
            if nxt is not None:
                self._queues[nxt].put(chunk)

    def _run(self, stage: str, step, chunk: _Chunk) -> str | None:
        if chunk.index > chunk.job.first_failure:
            self._settle(chunk, False, None)  # a chunk before it failed: no point landing it
            return None
        t0 = time.perf_counter()
        try:
            return step(chunk)
        except ShadowServeError as exc:
            self._settle(chunk, False, f"{stage}: {exc}", failure_kind(stage, exc))
        except Exception as exc:  # never let one bad chunk kill a stage thread
            self._settle(chunk, False, f"{stage}: {type(exc).__name__}: {exc}", "other")
        finally:
            dt = time.perf_counter() - t0
            with chunk.job.lock:
                chunk.job.stage_seconds[stage] = chunk.job.stage_seconds.get(stage, 0.0) + dt
            with self._busy_lock:
                self._busy[stage] += dt
                self._chunks[stage] += 1
                if stage == "fetch":
                    self._fetched_bytes += chunk.nbytes
        return None

    def _fetch(self, c: _Chunk) -> str | None:
        """Hot path: receive the stored bytes straight into a receive slot (no allocation)."""
        c.recv = self.receive.acquire(self.config.fetch_timeout)
        slot = self.receive.slot(c.recv)
        if self.tier is not None and not c.skip_tier:
            n = self.tier.get_into(c.key, slot)
            if n is not None:  # no network: straight on to decompress, which verifies it like any chunk
                c.nbytes, c.from_tier = n, True
                return "decompress"
        t0 = time.perf_counter()
        n = self.store.get_into(c.key, slot)
        with c.job.lock:
            span = c.job.store_span
            span[0], span[1] = min(span[0], t0), max(span[1], time.perf_counter())
        if n is None:
            self._settle(c, False, "fetch: chunk not in the store", "missing")
            return None
        c.nbytes = n
        return "decompress"

    def _decompress(self, c: _Chunk) -> str:
        """Hot path: verify the container and inflate its symbols into a staging slot."""
        c.staging = self.staging.acquire(self.config.fetch_timeout)
        try:
            c.header = self.codec.decompress_into(self.receive.slot(c.recv)[: c.nbytes], self.staging.slot(c.staging))
        except ChunkFormatError:
            if not c.from_tier:
                raise
            self.tier.drop(c.key)  # a bad tier copy is never used: read the chunk from the store instead
            self.staging.release(c.staging)
            self.receive.release(c.recv)
            c.staging = c.recv = -1
            c.from_tier, c.skip_tier, c.nbytes = False, True, 0
            return "fetch"
        if self.tier is not None and not c.from_tier:  # verified just now: only good chunks enter the tier
            self.tier.admit_fetched(c.key, self.receive.slot(c.recv)[: c.nbytes])
        self.receive.release(c.recv)
        c.recv = -1
        return "dequantize"

    def _dequantize(self, c: _Chunk) -> str | None:
        """Hot path: symbols -> KV values, straight into the destination blocks when they are one
        contiguous run the layout can view as a chunk (the common case), otherwise into a kv slot
        for the scatter stage. In ``gpu`` mode, on the serving GPU, straight into the blocks."""
        if self._gpu is not None:
            self._gpu.dequantize(c.header, self._staging_tensors[c.staging], c.staging, c.plan)
            self.staging.release(c.staging)
            c.staging = -1
            self._settle(c, True, None)
            return None
        dest = self._target.direct_view(c.plan)
        if dest is not None:
            self.codec.dequantize_into(c.header, self.staging.slot(c.staging), dest)
            self.staging.release(c.staging)
            c.staging = -1
            self._settle(c, True, None)
            return None
        c.kv = self.kvslots.acquire(self.config.fetch_timeout)
        self.codec.dequantize_into(c.header, self.staging.slot(c.staging), self._kv_views[c.kv])
        self.staging.release(c.staging)
        c.staging = -1
        return "scatter"

    def _scatter(self, c: _Chunk) -> None:
        """Hot path: one copy of the chunk into its destination KV blocks."""
        self._target.scatter(c.plan, self._kv_views[c.kv])
        self.kvslots.release(c.kv)
        c.kv = -1
        self._settle(c, True, None)

    def _save(self, c: _Chunk) -> None:
        """Gather a computed chunk from its blocks, encode it and put it in the store."""
        c.kv = self.kvslots.acquire(self.config.fetch_timeout)
        view = self._kv_views[c.kv]
        self._target.gather(c.plan, view)
        blob = self.codec.encode(view)
        self.kvslots.release(c.kv)
        c.kv = -1
        self.store.put(c.key, blob)
        if self.tier is not None:
            self.tier.put(c.key, blob)  # write-through: the store has it first
        c.nbytes = len(blob)
        self._settle(c, True, None)

    # ---- bookkeeping --------------------------------------------------------------------------

    def _settle(self, c: _Chunk, ok: bool, error: str | None, kind: str | None = None) -> None:
        for pool, attr in ((self.receive, "recv"), (self.staging, "staging"), (self.kvslots, "kv")):
            slot = getattr(c, attr)
            if slot >= 0:
                pool.release(slot)
                setattr(c, attr, -1)
        job = c.job
        with job.lock:
            job.results[c.index] = ok
            job.nbytes += c.nbytes if ok else 0
            if ok and job.kind == "fetch":
                if c.from_tier:
                    job.tier_chunks += 1
                    job.tier_bytes += c.nbytes
                else:
                    job.store_bytes += c.nbytes
            if not ok:
                job.first_failure = min(job.first_failure, c.index)
                if error:
                    job.errors.append(error)
                if kind:
                    job.error_kinds[kind] = job.error_kinds.get(kind, 0) + 1
            done = all(r is not None for r in job.results)
        if done:
            pending = getattr(self._tls, "finished", None)
            if pending is None:
                self._finish(job)
            else:
                pending.append(job)

    def _finish(self, job: _Job) -> None:
        ok = 0
        for r in job.results:
            if not r:
                break
            ok += 1
        cmd = job.command
        job.on_done(Completion(
            job_id=cmd.job_id, request_id=cmd.request_id, kind=job.kind, num_chunks=len(cmd.keys),
            ok_chunks=ok, error="; ".join(job.errors[:3]) or None, error_kinds=job.error_kinds, nbytes=job.nbytes,
            seconds=time.perf_counter() - job.start, stage_seconds=dict(job.stage_seconds),
            tier_chunks=job.tier_chunks, tier_bytes=job.tier_bytes, store_bytes=job.store_bytes,
            store_seconds=max(0.0, job.store_span[1] - job.store_span[0]),
            tier_events=self.tier.drain_events() if self.tier is not None else [],
        ))

    def stats(self) -> dict:
        """Per-stage busy ratio, busy seconds and chunks since start (or ``reset_stats``), buffer
        occupancy now and over the window (mean, peak), for metrics and the stage benchmark."""
        elapsed = max(1e-9, time.perf_counter() - self._started)
        with self._busy_lock:
            busy_s = dict(self._busy)
            chunks = dict(self._chunks)
            fetched = self._fetched_bytes
        pools = (self.receive, self.staging, self.kvslots)
        return {
            "elapsed_s": elapsed,
            "stage_busy_ratio": {s: v / elapsed for s, v in busy_s.items()},
            "stage_busy_seconds": busy_s,
            "stage_chunks": chunks,
            "fetched_bytes": fetched,
            "buffer_occupancy": {p.name: p.occupancy for p in pools},
            "buffer_in_use": {p.name: p.in_use for p in pools},
            "buffer_window": {p.name: p.window() for p in pools},
            "local_tier": self.tier.stats() if self.tier is not None else {},
        }

    def reset_stats(self) -> None:
        """Open a new accounting window: busy time, chunk counts and buffer occupancy start from zero."""
        with self._busy_lock:
            self._busy = dict.fromkeys(STAGES, 0.0)
            self._chunks = dict.fromkeys(STAGES, 0)
            self._fetched_bytes = 0
            self._started = time.perf_counter()
        for p in (self.receive, self.staging, self.kvslots):
            p.reset_window()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for stage, q in self._queues.items():
            for t in self._threads:
                if t.name.startswith(f"dp-{stage}-"):
                    q.put(None)
        for t in self._threads:
            t.join(timeout=2)
        # Drop every view of the engine's KV pool and of the slots, so closing frees the memory.
        self._target.close()
        self._kv_views = []
        self._staging_tensors = []
        if self._gpu is not None:
            self._gpu.close()
        for pool in (self.receive, self.staging, self.kvslots):
            pool.close()


def failure_kind(stage: str, exc: ShadowServeError) -> str:
    """What a chunk's failure says about the store, for the operator's error counts (ERROR_KINDS)."""
    if isinstance(exc, ChunkFormatError):
        return "corrupt"
    if isinstance(exc, StoreUnavailable):
        return "unreachable"
    if isinstance(exc, StoreError):
        return "rejected" if stage == "save" else "other"
    return "other"
