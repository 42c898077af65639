"""``shadowserve bench load``: a serving load test with ``vllm bench serve``'s metrics.

The store is warmed with the workload's shared prefixes first; then each fetch mode serves the
same requests at the same Poisson arrival times (or fixed concurrency), one mode after another in
one run, so their numbers can be set side by side. Requests go through a driver (in-process here)
and every metric is computed from the driver's per-request records.
"""

from __future__ import annotations

import argparse
import time

from tqdm import tqdm

from shadowserve.bench.common.codec_flags import add_codec_arguments, codec_from_args
from shadowserve.bench.common.drivers import RequestSpec, drive
from shadowserve.bench.common.engine_driver import EngineDriver
from shadowserve.bench.common.harness import Harness, store_url, write_json
from shadowserve.bench.common.http_driver import HTTPDriver
from shadowserve.bench.common.machine import machine_info
from shadowserve.bench.common.metrics import compute_metrics, format_table, parse_goodput
from shadowserve.bench.common.workloads import add_workload_arguments, build_workload, with_arrivals
from shadowserve.config import BASELINE_PLACEMENTS
from shadowserve.cores import pin_to_dataplane_cores
from shadowserve.model.loader import load_model
from shadowserve.store.launch import start_store_server


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--modes", default="offload", help="fetch modes, comma-separated, run one after another")
    add_workload_arguments(p)
    p.add_argument("--request-rate", type=float, default=float("inf"), help="Poisson arrivals, req/s (inf: all at once)")
    p.add_argument("--max-concurrency", type=int, default=None, help="requests in flight at most")
    p.add_argument("--goodput", nargs="+", metavar="METRIC:MS", help="SLOs for goodput, e.g. ttft:2000 tpot:300")
    p.add_argument("--percentiles", default="99", help="latency percentiles to report, e.g. 50,90,99")
    p.add_argument("--bandwidth", type=float, default=None, help="emulated link to the store, Gbit/s")
    p.add_argument("--store", default=None, help="store URL (default: a local store server)")
    p.add_argument("--kv-cache-memory", default="3GiB")
    p.add_argument("--baseline-cores", default="reserved", choices=BASELINE_PLACEMENTS,
                   help="where sync and thread run their pipelines: reserved (the data-plane cores) or engine "
                        "(the engine's cores: the paper's CacheGen-Async placement); thread@engine in --modes overrides")
    add_codec_arguments(p)
    p.add_argument("--url", default=None,
                   help="benchmark a running server (http://host:port) instead of in-process engines; "
                        "it is warmed by sending it the workload's prefixes first")
    p.add_argument("--api-key", default=None, help="bearer token for --url")


def run(args: argparse.Namespace) -> int:
    slos = parse_goodput(args.goodput)
    percentiles = [float(q) for q in args.percentiles.split(",") if q]
    if args.url:
        return _run_http(args, slos, percentiles)
    loaded = load_model(args.model, "float32", progress=False)
    workload = build_workload(args, loaded.tokenizer, loaded.arch.max_position_embeddings)
    specs = with_arrivals(workload.specs, args.request_rate, args.seed)
    server = None if args.store else start_store_server("--capacity", "8GiB")
    if server is not None:
        pin_to_dataplane_cores(server.pid)
    base = args.store or server.url
    h = Harness(loaded, base, codec_from_args(args), kv_cache_memory=args.kv_cache_memory,
                baseline_cores=args.baseline_cores)
    results = {}
    try:
        print(f"warming the store with {len(workload.warm_prompts)} prefixes "
              f"({sum(map(len, workload.warm_prompts))} tokens)", flush=True)
        h.warm(workload.warm_prompts)
        for mode in args.modes.split(","):
            eng = h.engine(mode, store_url=store_url(base, args.bandwidth))
            try:
                with tqdm(total=len(specs), desc=mode, unit="req", leave=False) as bar:
                    records = drive(EngineDriver(eng), specs, args.max_concurrency, lambda: bar.update())
            finally:
                eng.close()
            m = compute_metrics(records, percentiles, slos)
            results[mode] = m
            print(format_table(m, f"{mode} ({workload.name})"), flush=True)
    finally:
        if server is not None:
            server.stop()
    if len(results) > 1:
        print(f"{'mode':<10} {'req/s':>7} {'out tok/s':>10} {'mean TTFT':>10} {'p99 TTFT':>10} "
              f"{'mean TPOT':>10} {'p99 TPOT':>10}" + (f" {'goodput':>8}" if slos else ""))
        for mode, m in results.items():
            print(f"{mode:<10} {m['request_throughput']:>7.2f} {m['output_throughput']:>10.1f} "
                  f"{m['mean_ttft_ms']:>10.0f} {m['p99_ttft_ms']:>10.0f} {m['mean_tpot_ms']:>10.0f} "
                  f"{m['p99_tpot_ms']:>10.0f}" + (f" {m['request_goodput']:>8.2f}" if slos else ""))
    write_json(args.json_path, {
        "model": args.model, "workload": workload.name, "num_requests": len(specs),
        "request_rate": args.request_rate, "max_concurrency": args.max_concurrency,
        "bandwidth_gbps": args.bandwidth, "goodput_slos_ms": {k: v * 1e3 for k, v in slos.items()},
        "machine": machine_info(), "modes": results,
    })
    return 0


def _run_http(args: argparse.Namespace, slos: dict, percentiles: list[float]) -> int:
    """The same workload and metrics against a running server; its fetch mode is the server's own."""
    loaded = load_model(args.model, "float32", progress=False)  # for its tokenizer and context length
    workload = build_workload(args, loaded.tokenizer, loaded.arch.max_position_embeddings)
    specs = with_arrivals(workload.specs, args.request_rate, args.seed)
    driver = HTTPDriver(args.url, api_key=args.api_key)
    print(f"warming {args.url} with {len(workload.warm_prompts)} prefixes", flush=True)
    warm = driver.run([RequestSpec(tuple(p), 1) for p in workload.warm_prompts], max_concurrency=1)
    if not all(r.ok for r in warm):
        print(f"warning: {sum(not r.ok for r in warm)} warm-up requests failed: {next(r.error for r in warm if not r.ok)}")
    time.sleep(2.0)  # the server saves computed chunks after answering; let those land first
    with tqdm(total=len(specs), desc="server", unit="req", leave=False) as bar:
        records = drive(driver, specs, args.max_concurrency, lambda: bar.update())
    m = compute_metrics(records, percentiles, slos)
    print(format_table(m, f"{args.url} ({workload.name})"), flush=True)
    write_json(args.json_path, {
        "url": args.url, "model": driver.model, "workload": workload.name, "num_requests": len(specs),
        "request_rate": args.request_rate, "max_concurrency": args.max_concurrency,
        "goodput_slos_ms": {k: v * 1e3 for k, v in slos.items()}, "machine": machine_info(), "modes": {"server": m},
    })
    return 0
