"""``shadowserve bench ttft``: time to first token of a request whose long prefix is in the store,
over emulated links of several bandwidths, for each fetch mode, unloaded and beside a decoding batch.

Each row also carries ``bound_ms``: max(compressed bytes / link rate, the slowest pipeline stage run
alone over the same chunks) + the suffix prefill, so the gap between a mode and what the hardware
allows is visible directly. ``bound_one_core_ms`` is the same with the stages' sum in place of the
slowest one: what a single data-plane core allows, the stages taking turns on it. The stage and
suffix times are re-measured at every bandwidth, right before that bandwidth's modes run, and the
fastest of a few repeats counts: a bound is what the machine can do, and one slow moment of a noisy
machine must not raise it.

Rows of modes that fetch also split each request's own TTFT: ``fetch_ms`` (in FETCHING) and
``after_fetch_ms`` (KV landed -> first token: the suffix prefill). ``bound_same_request_ms`` is the
bound with that same request's suffix prefill, so TTFT over it reads the fetch's overhead alone,
free of the drift between a prefill timed alone and the one the request really ran.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import time

import numpy as np
import torch

from shadowserve.bench.common.codec_flags import add_codec_arguments, codec_from_args
from shadowserve.bench.common.harness import (
    Harness,
    add_model_arguments,
    doc_prompt,
    load_for,
    run_to_end,
    write_json,
)
from shadowserve.controlplane.stats import ManagerStats
from shadowserve.cores import pin_to_dataplane_cores
from shadowserve.engine.request import SamplingParams
from shadowserve.errors import ConfigError
from shadowserve.kvcache.chunking import chunk_keys, key_seed
from shadowserve.kvcache.codec import KVCodec
from shadowserve.store import open_store
from shadowserve.store.launch import start_store_server


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p, kv_cache_memory="3GiB")
    p.add_argument("--modes", default="sync,thread,offload")
    p.add_argument("--bandwidths", default="1,2,5,10,20", help="link rates in Gbit/s")
    p.add_argument("--prefix-tokens", type=int, default=8192 - 256, help="cached prefix (a chunk multiple)")
    p.add_argument("--batch", type=int, default=8, help="decoding requests in the loaded runs")
    p.add_argument("--no-loaded", action="store_true", help="skip the runs beside a decoding batch")
    p.add_argument("--repeats", type=int, default=3, help="requests per row; the row's TTFT is their median")
    add_codec_arguments(p)


def stage_times(h, prompt: list[int], repeats: int = 3) -> dict:
    """Each pipeline stage alone over the prompt's stored chunks (seconds, fastest of ``repeats``)."""
    codec = KVCodec(h.codec, h.loaded.fingerprint)
    keys = chunk_keys(prompt, h.chunk_size, key_seed(h.loaded.fingerprint, codec.kv_format_id))
    store = open_store(h.store_url)
    arch = h.loaded.arch
    shape = (arch.num_hidden_layers, 2, h.chunk_size, arch.num_key_value_heads, arch.head_dim)
    recv = np.empty(codec.max_encoded_nbytes(shape), np.uint8)
    best: dict[str, float] = {}
    try:
        for _ in range(repeats):
            for stage, seconds in _stages_once(codec, store, keys, shape, recv, h.loaded.model.dtype).items():
                best[stage] = min(seconds, best.get(stage, seconds))
    finally:
        store.close()
    return best


def _stages_once(codec, store, keys, shape, recv, dtype) -> dict:
    t = time.perf_counter()
    blobs = []
    for k in keys:
        n = store.get_into(k, recv)
        if n is None:
            raise RuntimeError("prefix chunk missing from the store after warming")
        blobs.append(recv[:n].copy())
    fetch = time.perf_counter() - t
    staging = np.empty(codec.max_staging_nbytes(shape), np.uint8)
    out = torch.empty(shape, dtype=dtype)
    pool = torch.empty((shape[0] * 2, 256, shape[2] // 16, shape[3] * shape[4]), dtype=out.dtype)
    dest = torch.arange(shape[2] // 16) * 7 % 256
    headers, decomp, dequant, scatter = [], 0.0, 0.0, 0.0
    for blob in blobs:
        t = time.perf_counter()
        header = codec.decompress_into(blob, staging)
        decomp += time.perf_counter() - t
        t = time.perf_counter()
        codec.dequantize_into(header, staging, out)
        dequant += time.perf_counter() - t
        t = time.perf_counter()
        pool.view(shape[0] * 2, 256, -1).index_copy_(1, dest, out.view(shape[0] * 2, len(dest), -1))
        scatter += time.perf_counter() - t
        headers.append(header)
    return {"fetch_loopback_s": fetch, "decompress_s": decomp, "dequantize_s": dequant, "scatter_s": scatter,
            "compressed_bytes": int(sum(len(b) for b in blobs)), "chunks": len(blobs)}


def suffix_prefill_s(h, prompt: list[int]) -> float:
    """The suffix prefill alone (fastest of 2): the prefix already in local blocks, nothing to fetch."""
    local = h.local_engine(enable_prefix_caching=True)
    try:
        run_to_end(local, [local.add_request(prompt, SamplingParams(max_tokens=1))])
        return min(run_to_end(local, [local.add_request(prompt, SamplingParams(max_tokens=1))])[0].ttft
                   for _ in range(2))
    finally:
        local.close()


def _plane_stats(eng):
    return dataclasses.replace(eng.kv_manager.stats) if eng.kv_manager is not None else ManagerStats()


def _stage_busy(eng) -> dict:
    """Seconds each pipeline stage has been busy so far (fresh: waits for the offload plane's next beat)."""
    if eng.kv_manager is None:
        return {}
    backend = eng.kv_manager.backend
    if hasattr(backend, "process"):
        time.sleep(1.5 * backend.spec.config.heartbeat_interval)
        eng.scheduler.collect_fetched()  # takes the heartbeat (and applies any fetch that ended)
    return dict(backend.stats().get("stage_busy_seconds", {}))


def _breakdown(fetch_ms: list[float], after_ms: list[float], fetch_bound_s: float) -> dict:
    """The requests' own TTFT split (median fetch, median time from KV landed to first token), and
    the bound again with that same request's own suffix prefill in place of the one timed alone.

    The suffix prefill is most of TTFT here and varies by tens of percent between moments on a
    noisy machine; taking it from the very request removes that drift from TTFT/bound, leaving
    what the fetch adds over the link or the slowest stage.
    """
    if not after_ms:
        return {}
    after = statistics.median(after_ms)
    return {"fetch_ms": statistics.median(fetch_ms), "after_fetch_ms": after,
            "bound_same_request_ms": fetch_bound_s * 1e3 + after}


def run(args: argparse.Namespace) -> int:
    if args.repeats < 1:
        raise ConfigError(f"--repeats must be >= 1, got {args.repeats}")
    loaded = load_for(args)
    server = start_store_server("--capacity", "8GiB")
    pin_to_dataplane_cores(server.pid)
    h = Harness(loaded, server.url, codec_from_args(args), kv_cache_memory=args.kv_cache_memory, device=args.device,
                workers=args.dataplane_workers, dataplane_cores=args.dataplane_cores,
                baseline_cores=args.baseline_cores)
    tok = loaded.tokenizer
    prompt = doc_prompt(tok, args.prefix_tokens, offset=0)
    warmup = doc_prompt(tok, 4 * h.chunk_size, offset=300)  # fetched once per engine before timing
    decoders = [doc_prompt(tok, 128, offset=400 + 3 * i) for i in range(args.batch)]
    bandwidths = [float(b) for b in args.bandwidths.split(",")]
    rows = []
    try:
        h.warm([prompt, warmup])
        points = []
        for gbps in bandwidths:
            # The bound's parts, measured again at every point: drift between points lands on them too.
            stages = stage_times(h, prompt)
            suffix_s = suffix_prefill_s(h, prompt)
            slowest = max(stages["decompress_s"], stages["dequantize_s"], stages["scatter_s"])
            link_s = stages["compressed_bytes"] * 8 / (gbps * 1e9)
            bound = max(link_s, slowest) + suffix_s
            # With every stage on one data-plane core they take turns: their sum is what that core allows
            # (scatter left out: contiguous destinations are written by dequantize directly).
            one_core = max(link_s, stages["fetch_loopback_s"] + stages["decompress_s"] + stages["dequantize_s"])
            bound_one_core = one_core + suffix_s
            points.append({"bandwidth_gbps": gbps, "stages": stages, "suffix_prefill_ms": suffix_s * 1e3,
                           "bound_ms": bound * 1e3, "bound_one_core_ms": bound_one_core * 1e3})
            print(f"{gbps:g} Gbit/s: prefix {args.prefix_tokens} tokens in {stages['chunks']} chunks, "
                  f"{stages['compressed_bytes'] / 1e6:.1f} MB compressed; stages alone (fastest of 3): "
                  f"decompress {stages['decompress_s'] * 1e3:.0f} ms, dequantize {stages['dequantize_s'] * 1e3:.0f} "
                  f"ms, scatter {stages['scatter_s'] * 1e3:.0f} ms; suffix prefill {suffix_s * 1e3:.0f} ms")
            print(f"{'mode':<14} {'Gbit/s':>7} {'loaded':>7} {'TTFT ms':>9} {'bound ms':>9} {'TTFT/bound':>11} "
                  f"{'/1-core bound':>14} {'/same-req bound':>16} "
                  f"{'fetch job ms':>13} {'fetch ms':>9} {'after ms':>9}")
            url = f"{server.url}?bandwidth={gbps}gbit"
            for mode in args.modes.split(","):
                eng = h.engine(mode, store_url=url)
                try:
                    run_to_end(eng, [eng.add_request(warmup, SamplingParams(max_tokens=1))])
                    for loaded_run in ([False] if args.no_loaded else [False, True]):
                        batch = []
                        if loaded_run:
                            batch = [eng.add_request(p, SamplingParams(max_tokens=10_000, ignore_eos=True))
                                     for p in decoders]
                            while any(r.num_computed_tokens < len(r.prompt_token_ids) for r in batch):
                                eng.step()
                        before, busy0 = _plane_stats(eng), _stage_busy(eng)
                        samples, fetched, fetch_ms, after_ms = [], [], [], []
                        for _ in range(args.repeats):  # the same request again: it fetches again
                            req = eng.add_request(prompt, SamplingParams(max_tokens=1))
                            while not req.is_finished:
                                eng.step()
                            samples.append(req.ttft * 1e3)
                            fetched.append(req.num_fetched_tokens)
                            if req.fetch_end_time is not None:  # the TTFT breakdown: fetch, then the rest
                                fetch_ms.append(req.fetch_seconds * 1e3)
                                after_ms.append((req.first_token_time - req.fetch_end_time) * 1e3)
                        after, busy1 = _plane_stats(eng), _stage_busy(eng)
                        for r in batch:
                            eng.abort_request(r.request_id)
                        if min(fetched) < args.prefix_tokens:
                            print(f"  warning: {mode} fetched only {min(fetched)} tokens")
                        row = {"mode": mode, "bandwidth_gbps": gbps, "loaded": loaded_run,
                               "ttft_ms": statistics.median(samples), "ttft_samples_ms": samples,
                               "bound_ms": bound * 1e3, "bound_one_core_ms": bound_one_core * 1e3,
                               "fetched_tokens": min(fetched),
                               **_breakdown(fetch_ms, after_ms, max(link_s, slowest)),
                               # the data plane's own time per job (submit -> last chunk landed)
                               "fetch_job_ms": (after.fetch_seconds - before.fetch_seconds) * 1e3 / args.repeats,
                               "fetch_failures": after.fetch_failures - before.fetch_failures,
                               "dataplane_restarts": after.dataplane_restarts - before.dataplane_restarts,
                               "stage_busy_s": {k: busy1[k] - busy0.get(k, 0.0) for k in busy1}}  # over all repeats
                        rows.append(row)
                        print(f"{mode:<14} {gbps:>7g} {str(loaded_run):>7} {row['ttft_ms']:>9.0f} "
                              f"{row['bound_ms']:>9.0f} {row['ttft_ms'] / row['bound_ms']:>11.2f} "
                              f"{row['ttft_ms'] / row['bound_one_core_ms']:>14.2f} "
                              f"{row['ttft_ms'] / row.get('bound_same_request_ms', math.nan):>16.2f} "
                              f"{row['fetch_job_ms']:>13.0f} {row.get('fetch_ms', math.nan):>9.0f} "
                              f"{row.get('after_fetch_ms', math.nan):>9.0f}"
                              + (f"  failures {row['fetch_failures']}, restarts {row['dataplane_restarts']}"
                                 if row["fetch_failures"] or row["dataplane_restarts"] else ""), flush=True)
                        if row["stage_busy_s"]:
                            print("    stage busy s: " + ", ".join(
                                f"{k} {v:.2f}" for k, v in row["stage_busy_s"].items() if v), flush=True)
                finally:
                    eng.close()
    finally:
        server.stop()
    write_json(args.json_path, {"model": args.model, "device": args.device, "dtype": args.dtype,
                                "prefix_tokens": args.prefix_tokens, "points": points, "rows": rows})
    return 0
