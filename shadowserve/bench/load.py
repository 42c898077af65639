"""``shadowserve bench load``: a serving load test with ``vllm bench serve``'s metrics.

The store is warmed with the workload's shared prefixes first; then each fetch mode serves the
same requests at the same Poisson arrival times (or fixed concurrency), one mode after another in
one run, so their numbers can be set side by side. Requests go through a driver (in-process here)
and every metric is computed from the driver's per-request records.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

from tqdm import tqdm

from shadowserve.bench import workloads as w
from shadowserve.bench.codec_flags import add_codec_arguments, codec_from_args
from shadowserve.bench.drivers import Driver, RequestRecord, RequestSpec
from shadowserve.bench.engine_driver import EngineDriver
from shadowserve.bench.harness import Harness, write_json
from shadowserve.bench.http_driver import HTTPDriver
from shadowserve.bench.machine import machine_info
from shadowserve.bench.metrics import compute_metrics, format_table, parse_goodput
from shadowserve.bench.workloads import with_arrivals
from shadowserve.cores import pin_to_dataplane_cores
from shadowserve.errors import ConfigError
from shadowserve.model.loader import load_model
from shadowserve.store.launch import start_store_server

WORKLOADS = ("long-doc-qa", "chat", "prefix-repetition")


def _range(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition(":")
    try:
        a, b = int(lo), int(hi or lo)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or LO:HI, got {text!r}") from None
    if not 1 <= a <= b:
        raise argparse.ArgumentTypeError(f"expected 1 <= LO <= HI, got {text!r}")
    return a, b


def add_workload_arguments(p: argparse.ArgumentParser) -> None:
    """Workload and arrival flags (shared with ``bench paper``)."""
    p.add_argument("--workload", choices=WORKLOADS, default="long-doc-qa")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-documents", type=int, default=4, help="long-doc-qa: documents")
    p.add_argument("--questions-per-doc", type=int, default=2, help="long-doc-qa: questions per document")
    p.add_argument("--doc-tokens", type=_range, default=(2048, 16384),
                   help="long-doc-qa: document length range LO:HI (capped to fit the model's context)")
    p.add_argument("--output-len", type=_range, default=(16, 256), help="output tokens, N or LO:HI")
    p.add_argument("--num-conversations", type=int, default=4, help="chat: conversations")
    p.add_argument("--rounds", type=int, default=3, help="chat: rounds per conversation")
    p.add_argument("--system-tokens", type=int, default=1024, help="chat: shared system prompt tokens")
    p.add_argument("--num-prompts", type=int, default=16, help="prefix-repetition: requests")
    p.add_argument("--prefix-len", type=int, default=2048, help="prefix-repetition: prefix tokens")
    p.add_argument("--suffix-len", type=int, default=128, help="prefix-repetition: suffix tokens")
    p.add_argument("--num-prefixes", type=int, default=4, help="prefix-repetition: distinct prefixes")


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
    add_codec_arguments(p)
    p.add_argument("--url", default=None,
                   help="benchmark a running server (http://host:port) instead of in-process engines; "
                        "it is warmed by sending it the workload's prefixes first")
    p.add_argument("--api-key", default=None, help="bearer token for --url")


def build_workload(args: argparse.Namespace, tokenizer, max_model_len: int):
    """The workload the flags describe, with prompts capped to fit the model's context."""
    out_hi = args.output_len[1]
    room = max_model_len - out_hi - 32  # question / suffix tokens
    if args.workload == "long-doc-qa":
        lo, hi = args.doc_tokens
        hi = min(hi, room)
        if hi < 16:
            raise ConfigError(f"the model's context ({max_model_len}) leaves no room for documents")
        return w.long_doc_qa(tokenizer, args.num_documents, args.questions_per_doc, (min(lo, hi), hi),
                             args.output_len, args.seed)
    if args.workload == "chat":
        return w.multi_round_chat(tokenizer, args.num_conversations, args.rounds, args.system_tokens,
                                  output_len=args.output_len, seed=args.seed)
    return w.prefix_repetition(tokenizer, args.num_prompts, min(args.prefix_len, room), args.suffix_len,
                               args.num_prefixes, args.output_len[0], args.seed)


def store_url(base: str, bandwidth_gbps: float | None) -> str:
    """The store URL with an emulated link of ``bandwidth_gbps`` (None: unshaped)."""
    if bandwidth_gbps is None:
        return base
    return f"{base}{'&' if '?' in base else '?'}bandwidth={bandwidth_gbps:g}gbit"


def drive(driver: Driver, specs: list[RequestSpec], max_concurrency: int | None,
          progress: Callable[[], None] | None = None) -> list[RequestRecord]:
    """Run the specs, after one short untimed request (first-step costs stay out of the numbers)."""
    warm = RequestSpec(specs[0].prompt_ids, 2)
    driver.run([warm])
    return driver.run(specs, max_concurrency, progress)


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
    h = Harness(loaded, base, codec_from_args(args), kv_cache_memory=args.kv_cache_memory)
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
