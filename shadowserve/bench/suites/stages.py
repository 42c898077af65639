"""``shadowserve bench stages``: each data-plane stage's throughput alone and inside the pipeline.

The paper found its network stage falling from 37.3 to 20.6 Gbit/s once every stage shared the
SmartNIC. Here the same real chunks (a real document's KV, stored by a real store server) go
through each stage alone on a data-plane core, then through the whole pipeline on the data-plane
cores. Inside the pipeline, a stage's throughput is the chunks it finished over its busy time; the
pipeline's is chunks over wall time. All throughputs are in Gbit/s of compressed chunk bytes (the
link rate the data plane could keep up with). Buffer occupancy and busy time are sampled over the run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time

import numpy as np
import torch

from shadowserve.bench.common.codec_flags import add_codec_arguments, codec_from_args
from shadowserve.bench.common.harness import Harness, doc_prompt, store_url, write_json
from shadowserve.bench.common.machine import machine_info
from shadowserve.config import DataPlaneConfig
from shadowserve.cores import pin_to_dataplane_cores
from shadowserve.dataplane.messages import FetchCommand
from shadowserve.dataplane.pipeline import Pipeline
from shadowserve.dataplane.spec import buffer_layout
from shadowserve.kvcache.chunking import chunk_keys, key_seed
from shadowserve.kvcache.codec import KVCodec
from shadowserve.model.loader import load_model
from shadowserve.store import open_store
from shadowserve.store.launch import start_store_server


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--prefix-tokens", type=int, default=4096, help="stored tokens (a chunk multiple) per job")
    p.add_argument("--repeats", type=int, default=4, help="jobs back to back (and repeats of each stage alone)")
    p.add_argument("--dataplane-cores", default="auto", help="cores for the data plane (default: as the engine)")
    p.add_argument("--decompress-workers", type=int, default=1)
    p.add_argument("--dequantize-workers", type=int, default=1)
    p.add_argument("--scattered", action="store_true",
                   help="non-contiguous destination blocks, so the scatter stage runs too")
    p.add_argument("--bandwidth", type=float, default=None, help="emulated link, Gbit/s (default: loopback)")
    add_codec_arguments(p)


def _on_cores(cores: list[int], fn):
    """Run ``fn`` in a thread pinned to ``cores`` (where the data plane runs) and return its result."""
    box: list = []

    def target() -> None:
        os.sched_setaffinity(0, cores)
        box.append(fn())

    t = threading.Thread(target=target)
    t.start()
    t.join()
    return box[0]


def measure(h, prompt: list[int], repeats: int, dataplane_cores: str = "auto", scattered: bool = False,
            store_url: str | None = None, decompress_workers: int = 1, sample_s: float = 0.005,
            dequantize_workers: int = 1) -> dict:
    """Stages alone, then the pipeline, over the prompt's stored chunks (the store must hold them)."""
    h.unpin()  # engines pinned this process to their cores; split the cores afresh
    cfg = DataPlaneConfig(fetch_mode="thread", chunk_size=h.chunk_size, dataplane_cores=dataplane_cores,
                          decompress_workers=decompress_workers, dequantize_workers=dequantize_workers)
    _, plane = cfg.split_cores()
    codec = KVCodec(h.codec, h.loaded.fingerprint)
    keys = chunk_keys(prompt, h.chunk_size, key_seed(h.loaded.fingerprint, codec.kv_format_id))
    arch = h.loaded.arch
    dtype = h.loaded.model.dtype
    shape = (arch.num_hidden_layers, 2, h.chunk_size, arch.num_key_value_heads, arch.head_dim)
    bs = 16
    bpc = h.chunk_size // bs
    n = len(keys)
    pool = torch.zeros(shape[0], 2, 2 * n * bpc, bs, shape[3], shape[4], dtype=dtype)
    layout = buffer_layout(shape, pool.element_size(), codec)
    # Destination blocks per chunk: one contiguous run each, or every other block (scatter path).
    dest = [tuple(range(c * bpc, (c + 1) * bpc)) if not scattered else tuple(range(2 * c * bpc, 2 * (c + 1) * bpc, 2))
            for c in range(n)]
    store = open_store(store_url or h.store_url)
    torch.set_num_threads(len(plane))

    # ---- each stage alone, on one data-plane core -------------------------------------------------
    recv = np.empty(layout.receive_bytes, np.uint8)
    staging = np.empty(layout.staging_bytes, np.uint8)
    kv = torch.empty(shape, dtype=dtype)
    rows = pool.view(shape[0] * 2, pool.shape[2], -1)

    def fetch_all() -> tuple[float, list[np.ndarray]]:
        blobs, busy = [], 0.0
        for k in keys:
            t = time.perf_counter()
            got = store.get_into(k, recv)
            busy += time.perf_counter() - t
            if got is None:
                raise RuntimeError("a chunk is missing from the store after warming")
            blobs.append(recv[:got].copy())
        return busy, blobs

    def timed(fn, items, keep=None) -> tuple[float, list]:
        """Seconds ``fn`` took over ``items``; ``keep(result)`` (untimed) saves what the next stage needs."""
        out, busy = [], 0.0
        for it in items:
            t = time.perf_counter()
            r = fn(it)
            busy += time.perf_counter() - t
            out.append(keep(r) if keep else None)
        return busy, out

    idx = [torch.tensor(d, dtype=torch.long) for d in dest]
    src = kv.view(shape[0] * 2, bpc, -1)

    def alone() -> dict:
        runs: dict[str, list[float]] = {s: [] for s in ("fetch", "decompress", "dequantize", "scatter")}
        for _ in range(repeats):
            t_fetch, blobs = fetch_all()
            t_dec, symbols = timed(lambda b: codec.decompress_into(b, staging), blobs, lambda hd: (hd, staging.copy()))
            t_deq, _ = timed(lambda hs: codec.dequantize_into(hs[0], hs[1], kv), symbols)
            t_sc, _ = timed(lambda i: rows.index_copy_(1, i, src), idx)
            for s, v in zip(runs, (t_fetch, t_dec, t_deq, t_sc)):
                runs[s].append(v)
        return {"runs_s": runs, "blobs": blobs}

    res = _on_cores(plane[:1], alone)
    nbytes = sum(len(b) for b in res["blobs"])
    gbit = nbytes * 8 / 1e9  # one pass over the chunks, in Gbit
    alone_out = {}
    for s, runs in res["runs_s"].items():
        sec = statistics.median(runs)
        alone_out[s] = {"seconds": sec, "chunks_per_s": n / sec, "gbps": gbit / sec}
    path = ["fetch", "decompress", "dequantize"] + (["scatter"] if scattered else [])

    # ---- the whole pipeline on the data-plane cores ----------------------------------------------
    pipe = Pipeline(cfg, store, codec, pool, layout, on_thread_start=lambda: os.sched_setaffinity(0, plane))
    try:
        done = threading.Semaphore(0)
        failures: list[str] = []

        def on_done(c) -> None:
            if not c.ok:
                failures.append(c.error or "failed")
            done.release()

        pipe.submit(FetchCommand(-1, "warm", tuple(keys), tuple(dest)), on_done)  # untimed warm-up job
        done.acquire()
        pipe.reset_stats()
        timeline, stop = [], threading.Event()

        def sample() -> None:
            t0 = time.perf_counter()
            while not stop.is_set():
                st = pipe.stats()
                timeline.append({"t": time.perf_counter() - t0, "in_use": st["buffer_in_use"],
                                 "busy_s": st["stage_busy_seconds"]})
                stop.wait(sample_s)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        t0 = time.perf_counter()
        for j in range(repeats):
            pipe.submit(FetchCommand(j, f"job{j}", tuple(keys), tuple(dest)), on_done)
        for _ in range(repeats):
            done.acquire()
        wall = time.perf_counter() - t0
        stats = pipe.stats()
        stop.set()
        sampler.join()
    finally:
        pipe.close()
        store.close()
    if failures:
        raise RuntimeError(f"pipeline jobs failed: {failures[:2]}")
    inside = {}
    # A stage's busy time includes waiting for a free slot in the pool it fills (back-pressure
    # from the next stage): take that out, so "inside" is the stage's own work rate.
    fills = {"fetch": "receive", "decompress": "staging", "dequantize": "kv"}
    for s in path:
        waited = stats["buffer_window"][fills[s]]["wait_s"] if s in fills else 0.0
        busy = stats["stage_busy_seconds"][s] - waited
        cnt = stats["stage_chunks"][s]
        inside[s] = {"busy_s": busy, "blocked_s": waited, "chunks": cnt, "busy_ratio": busy / wall,
                     "chunks_per_s": cnt / busy if busy else float("nan"),
                     "gbps": (cnt / n) * gbit / busy if busy else float("nan")}
    # A stage with w workers on c data-plane cores can do at most min(w, c) times its one-thread rate.
    workers = cfg.stage_workers()
    capacity = {s: alone_out[s]["gbps"] * max(1, min(workers[s], len(plane))) for s in path}
    slowest = min(path, key=lambda s: capacity[s])
    piped = {"wall_s": wall, "chunks_per_s": repeats * n / wall, "gbps": repeats * gbit / wall}
    one_core = 1 / sum(alone_out[s]["seconds"] for s in path) * gbit  # all stages sharing one core
    return {
        "chunks": n, "compressed_bytes": nbytes, "raw_bytes": n * int(np.prod(shape)) * pool.element_size(),
        "dataplane_cores": plane, "scattered": scattered, "path": path,
        "alone": alone_out, "inside": inside, "pipelined": piped,
        "stage_workers": {s: workers[s] for s in path}, "stage_capacity_gbps": capacity,
        "slowest_alone": slowest, "efficiency": piped["gbps"] / capacity[slowest],
        "one_core_bound_gbps": one_core,
        "buffers": stats["buffer_window"], "timeline": timeline,
    }


def print_report(r: dict) -> None:
    print(f"{r['chunks']} chunks, {r['compressed_bytes'] / 1e6:.1f} MB compressed "
          f"({r['raw_bytes'] / r['compressed_bytes']:.1f}x), data-plane cores {r['dataplane_cores']}")
    print(f"{'stage':<11} {'alone Gbit/s':>13} {'inside Gbit/s':>14} {'inside/alone':>13} {'busy ratio':>11}")
    for s in r["path"]:
        a, i = r["alone"][s], r["inside"][s]
        print(f"{s:<11} {a['gbps']:>13.2f} {i['gbps']:>14.2f} {i['gbps'] / a['gbps']:>13.2f} {i['busy_ratio']:>11.2f}")
    p = r["pipelined"]
    slowest = r["slowest_alone"]
    per = f" x {r['stage_workers'][slowest]} workers" if r["stage_workers"][slowest] > 1 else ""
    print(f"pipelined: {p['gbps']:.2f} Gbit/s ({p['chunks_per_s']:.1f} chunks/s) = {r['efficiency']:.0%} of the "
          f"slowest stage alone ({slowest}{per}); all stages on one core would allow "
          f"{r['one_core_bound_gbps']:.2f} Gbit/s")
    print("buffers (time-weighted mean occupancy, peak in use / slots): " + ", ".join(
        f"{k} {v['mean_occupancy']:.0%} {v['peak_in_use']}/{v['slots']}" for k, v in r["buffers"].items()))


def run(args: argparse.Namespace) -> int:
    loaded = load_model(args.model, "float32", progress=False)
    server = start_store_server("--capacity", "8GiB")
    pin_to_dataplane_cores(server.pid)
    h = Harness(loaded, server.url, codec_from_args(args))
    prompt = doc_prompt(loaded.tokenizer, args.prefix_tokens, offset=0)
    try:
        h.warm([prompt])
        r = measure(h, prompt, args.repeats, args.dataplane_cores, args.scattered,
                    store_url(server.url, args.bandwidth), args.decompress_workers,
                    dequantize_workers=args.dequantize_workers)
    finally:
        server.stop()
    print_report(r)
    write_json(args.json_path, {"model": args.model, "prefix_tokens": args.prefix_tokens,
                                "bandwidth_gbps": args.bandwidth, "machine": machine_info(), **r})
    return 0
