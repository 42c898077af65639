"""``shadowserve bench gpu_copy``: does the data plane land KV in GPU memory at the link's speed?

Three figures side by side in one run, for chunks of a model's KV shape:

* ``raw``: one large pinned host -> device copy per chunk's worth of bytes (what the PCIe link and the
  copy engine allow);
* ``scatter``: the landing stage exactly as the data plane runs it (``CudaEngineKV.scatter``: one
  copy per (layer, K/V) plane of each run of destination blocks, on its own low-priority stream,
  waiting for completion), chunk after chunk from a ring of pinned slots, for contiguous and for
  scattered destination blocks;
* ``pipeline``: the whole thread-mode pipeline (store -> receive -> staging -> kv slot -> GPU) with
  a codec that does no work (``quant=none, lossless=none``), so host memory copies, not
  decompression, set its pace.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

import torch

from shadowserve.bench.common.harness import write_json
from shadowserve.config import CodecConfig, DataPlaneConfig
from shadowserve.dataplane.buffers import SlotPool
from shadowserve.dataplane.kv_targets import CudaEngineKV
from shadowserve.dataplane.messages import FetchCommand
from shadowserve.dataplane.pipeline import Pipeline
from shadowserve.dataplane.spec import buffer_layout
from shadowserve.kvcache.codec import KVCodec
from shadowserve.model.loader import torch_dtype
from shadowserve.model.registry import MODELS
from shadowserve.store.memory import MemoryStore


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="llama3-8b-shape", help="a registry model: only its KV shape is used")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default="cuda")
    p.add_argument("--chunk-size", type=int, default=256)
    p.add_argument("--chunks", type=int, default=32, help="chunks per timed pass")
    p.add_argument("--repeats", type=int, default=5, help="timed passes; medians are reported")
    p.add_argument("--workers", type=int, default=4, help="fetch/decompress/dequantize workers of the pipeline run")


def run(args: argparse.Namespace) -> int:
    if not torch.cuda.is_available():
        print("error: bench gpu_copy needs a CUDA GPU")
        return 2
    arch = MODELS[args.model].arch
    dtype = torch_dtype(args.dtype)
    bs = 16
    chunk_shape = (arch.num_hidden_layers, 2, args.chunk_size, arch.num_key_value_heads, arch.head_dim)
    elem = torch.empty((), dtype=dtype).element_size()
    chunk_bytes = elem
    for d in chunk_shape:
        chunk_bytes *= d
    bpc = args.chunk_size // bs
    num_blocks = args.chunks * bpc
    pool = torch.zeros((arch.num_hidden_layers, 2, num_blocks, bs, arch.num_key_value_heads, arch.head_dim),
                       dtype=dtype, device=args.device)
    slots = SlotPool("kv", 4, chunk_bytes, pinned=True)
    views = [slots.tensor(i)[:chunk_bytes].view(dtype).view(chunk_shape) for i in range(4)]
    for v in views:
        v.copy_(torch.randn(chunk_shape).to(dtype))  # never time on zeros
    total = args.chunks * chunk_bytes
    print(f"{args.model} KV chunk of {args.chunk_size} tokens: {chunk_bytes / 2**20:.1f} MiB; "
          f"{args.chunks} chunks ({total / 2**30:.2f} GiB) per pass, {args.repeats} passes")

    # raw: flat copies of whole slots into a flat device buffer
    flat_dev = torch.empty(chunk_bytes, dtype=torch.uint8, device=args.device)
    flat_src = [slots.tensor(i)[:chunk_bytes] for i in range(4)]
    stream = torch.cuda.Stream(priority=0)

    def raw_pass() -> float:
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.cuda.stream(stream):
            for i in range(args.chunks):
                flat_dev.copy_(flat_src[i % 4], non_blocking=True)
        stream.synchronize()
        return time.perf_counter() - t

    target = CudaEngineKV(pool, args.chunk_size)
    contiguous = [target.plan(tuple(range(i * bpc, (i + 1) * bpc))) for i in range(args.chunks)]
    perm = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(0)).tolist()
    scattered = [target.plan(tuple(perm[i * bpc:(i + 1) * bpc])) for i in range(args.chunks)]

    def scatter_pass(plans) -> float:
        torch.cuda.synchronize()
        t = time.perf_counter()
        for i, plan in enumerate(plans):
            target.scatter(plan, views[i % 4])
        return time.perf_counter() - t

    results = {}
    for name, fn in (("raw", raw_pass), ("scatter_contiguous", lambda: scatter_pass(contiguous)),
                     ("scatter_scattered", lambda: scatter_pass(scattered))):
        fn()  # warm-up
        times = [fn() for _ in range(args.repeats)]
        results[name] = {"median_s": statistics.median(times), "gbps": total / statistics.median(times) / 1e9}
    # Correctness of what was timed: the last pass's chunks are in their blocks.
    for i in (0, args.chunks - 1):
        got = pool[:, :, list(scattered[i].blocks.tolist())].reshape(chunk_shape).cpu()
        if not torch.equal(got, views[i % 4]):
            print("error: scattered chunk did not land intact")
            return 1
    results["pipeline"] = _pipeline_pass(args, pool, chunk_shape, chunk_bytes, contiguous, views)
    raw = results["raw"]["gbps"]
    print(f"{'path':<20} {'GB/s':>8} {'of raw':>7}")
    for name, r in results.items():
        print(f"{name:<20} {r['gbps']:>8.2f} {r['gbps'] / raw:>7.2f}")
    write_json(args.json_path, {"model": args.model, "dtype": args.dtype, "chunk_bytes": chunk_bytes,
                                "chunks": args.chunks, "device_name": torch.cuda.get_device_name(),
                                "results": {k: {**v, "of_raw": v["gbps"] / raw} for k, v in results.items()}})
    slots.close()
    return 0


def _pipeline_pass(args, pool, chunk_shape, chunk_bytes, plans, views) -> dict:
    """The whole pipeline in this process, its codec doing no work: store -> slots -> GPU blocks."""
    codec = KVCodec(CodecConfig(quant="none", lossless="none"), "bench")
    store = MemoryStore()
    blobs = [codec.encode(views[i]) for i in range(4)]
    keys = tuple(b"c%d" % i for i in range(len(plans)))
    for i, k in enumerate(keys):
        store.put(k, blobs[i % 4])
    w = args.workers
    cfg = DataPlaneConfig(fetch_mode="thread", chunk_size=args.chunk_size, fetch_workers=w, decompress_workers=w,
                          dequantize_workers=w, receive_slots=2 * w, staging_slots=2 * w, kv_slots=2 * w)
    layout = buffer_layout(chunk_shape, pool.element_size(), codec)
    pipe = Pipeline(cfg, store, codec, pool, layout)
    blocks = tuple(tuple(p.blocks.tolist()) for p in plans)
    times = []
    try:
        for rep in range(args.repeats + 1):
            done, box = threading.Event(), []
            t = time.perf_counter()
            pipe.submit(FetchCommand(rep, "bench", keys, blocks), lambda c, ev=done, out=box: (out.append(c), ev.set()))
            done.wait(600)
            if not box or not box[0].ok:
                raise RuntimeError(f"pipeline pass failed: {box[0].error if box else 'timed out'}")
            if rep:
                times.append(time.perf_counter() - t)
        stats = pipe.stats()
    finally:
        pipe.close()
    med = statistics.median(times)
    busy = stats["stage_busy_seconds"]
    return {"median_s": med, "gbps": len(keys) * chunk_bytes / med / 1e9,
            "stage_busy_s": {k: v for k, v in busy.items() if v}}
