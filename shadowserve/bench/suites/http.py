"""``shadowserve bench http``: what the HTTP front end costs, side by side with the engine in-process.

The same requests (distinct prompts, exact output lengths, a fixed concurrency) run through the
in-process driver on an engine here and through the HTTP driver against ``shadowserve serve``
with the same engine settings, alternating round by round. The client runs on the same machine,
so its own JSON/SSE work counts against HTTP: the ratio is a lower bound.
"""

from __future__ import annotations

import argparse
import statistics

from tqdm import tqdm

from shadowserve.bench.common.drivers import drive
from shadowserve.bench.common.engine_driver import EngineDriver
from shadowserve.bench.common.harness import write_json
from shadowserve.bench.common.http_driver import HTTPDriver
from shadowserve.bench.common.machine import machine_info
from shadowserve.bench.common.metrics import compute_metrics
from shadowserve.bench.common.workloads import prefix_repetition, topic_tokens
from shadowserve.config import EngineConfig
from shadowserve.engine.engine import LLMEngine
from shadowserve.model.loader import load_model
from shadowserve.server.launch import start_api_server


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=256, help="tokens per prompt")
    p.add_argument("--output-len", type=int, default=64, help="tokens per answer (exact)")
    p.add_argument("--max-concurrency", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3, help="alternating in-process / HTTP rounds")
    p.add_argument("--kv-cache-memory", default="2GiB")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--engine-threads", type=int, default=0,
                   help="torch threads of both engines (0: torch's default, all cores); fewer leaves "
                        "the HTTP front end and the client a core of their own")


def run(args: argparse.Namespace) -> int:
    loaded = load_model(args.model, "float32", progress=False)
    stream = topic_tokens(loaded.tokenizer)
    cfg = EngineConfig(model=args.model, kv_cache_memory=args.kv_cache_memory, enable_prefix_caching=False,
                       num_threads=args.engine_threads)
    engine = LLMEngine(cfg, loaded=loaded, progress=False)
    server = start_api_server("--model", args.model, "--kv-cache-memory", args.kv_cache_memory,
                              "--set", "engine.enable_prefix_caching=false", "--set", "server.log_level=warning",
                              "--set", f"engine.num_threads={args.engine_threads}")
    drivers = {"in-process": EngineDriver(engine), "http": HTTPDriver(server.url)}
    rows: dict[str, list[dict]] = {name: [] for name in drivers}
    try:
        for r in range(args.rounds):
            # Fresh prompts each round (same shape), so nothing is reused between rounds or drivers.
            specs = prefix_repetition(loaded.tokenizer, args.num_prompts, args.prompt_len // 2,
                                      args.prompt_len - args.prompt_len // 2, args.num_prompts,
                                      args.output_len, args.seed + r, stream).specs
            order = list(drivers) if r % 2 == 0 else list(reversed(drivers))
            for name in order:
                with tqdm(total=len(specs), desc=f"round {r + 1} {name}", unit="req", leave=False) as bar:
                    records = drive(drivers[name], specs, args.max_concurrency, lambda: bar.update())
                m = compute_metrics(records, (50, 99))
                if m["completed"] != len(specs):
                    raise RuntimeError(f"{name}: only {m['completed']} of {len(specs)} requests completed")
                rows[name].append(m)
    finally:
        server.stop()
        engine.close()

    def med(name: str, key: str) -> float:
        return statistics.median(m[key] for m in rows[name])

    print(f"{args.num_prompts} requests x {args.rounds} rounds, prompt {args.prompt_len}, output {args.output_len}, "
          f"concurrency {args.max_concurrency}, engine threads {args.engine_threads or 'default'} ({args.model}); "
          "medians over rounds")
    print(f"{'driver':<11} {'req/s':>7} {'out tok/s':>10} {'mean TTFT ms':>13} {'mean TPOT ms':>13}")
    for name in drivers:
        print(f"{name:<11} {med(name, 'request_throughput'):>7.2f} {med(name, 'output_throughput'):>10.1f} "
              f"{med(name, 'mean_ttft_ms'):>13.1f} {med(name, 'mean_tpot_ms'):>13.1f}")
    ratios = [h["request_throughput"] / i["request_throughput"] for h, i in zip(rows["http"], rows["in-process"])]
    ratio = statistics.median(ratios)
    print(f"HTTP / in-process request throughput: {ratio:.3f} (per round: {', '.join(f'{x:.3f}' for x in ratios)})")
    write_json(args.json_path, {
        "model": args.model, "num_prompts": args.num_prompts, "prompt_len": args.prompt_len,
        "output_len": args.output_len, "max_concurrency": args.max_concurrency,
        "engine_threads": args.engine_threads, "rounds": rows,
        "http_over_in_process": ratio, "per_round_ratios": ratios, "machine": machine_info(),
    })
    return 0
