"""TTFT of a cached long prefix in vLLM: with ShadowServeConnector vs vLLM without it, one run.

    shadowserve bench vllm --prefix 4096 --rounds 5 [--json FILE]

Each configuration runs in its own process (vLLM's KV connector is process-global), against one
store server started here, on a random-weight Llama built here (outputs meaningless, timings real).
Per round a fresh document of ``--prefix`` tokens is asked a first question (cold: computed, and
saved by the connector) and, after vLLM's local prefix cache is dropped, a second question (the
document is now only in the store). TTFT is the wall time of a ``max_tokens=1`` generate.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

from shadowserve.errors import ConfigError

CHUNK_TOKENS = 256  # the connector's default chunk_size: only whole chunks are stored
CONFIGS = {
    "vllm": None,  # no connector: every prefix is computed
    "shadowserve lossless": {"quant": "none", "lossless": "zstd"},
    "shadowserve rms": {"quant": "rms", "lossless": "zstd"},
}


def _child(args: argparse.Namespace) -> dict:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    extra = json.loads(args.child_config)
    kvt = None
    if extra is not None:
        extra = {"store_url": args.store_url, "fetch_mode": args.fetch_mode, **extra}
        kvt = KVTransferConfig(kv_connector="ShadowServeConnector", kv_role="kv_both",
                               kv_connector_module_path="shadowserve.integrations.vllm",
                               kv_connector_extra_config=extra)
    llm = LLM(args.model, enforce_eager=True, dtype=args.dtype, max_model_len=args.prefix + 256,
              kv_transfer_config=kvt)
    one = SamplingParams(max_tokens=1, temperature=0.0)
    rng = random.Random(args.seed)

    def ttft(prompt: list[int]) -> tuple[float, int]:
        t0 = time.perf_counter()
        out = llm.generate([{"prompt_token_ids": prompt}], one, use_tqdm=False)[0]
        return time.perf_counter() - t0, out.num_cached_tokens or 0

    worker = sched = store = None
    if kvt is not None:
        from vllm.distributed.kv_transfer import get_kv_transfer_group

        from shadowserve.store.base import open_store

        worker = get_kv_transfer_group()
        sched = llm.llm_engine.engine_core.engine_core.scheduler.connector
        store = open_store(args.store_url)

    def settle(keys: list[bytes]) -> None:
        """Saves landed and vLLM's local prefix cache dropped: the next hit can only be the store."""
        deadline = time.monotonic() + 120
        while worker is not None and (worker.worker.backend.saving or not all(store.contains(keys))):
            if time.monotonic() > deadline:
                raise RuntimeError("saves did not land within 120 s")
            worker.worker.collect()
            time.sleep(0.005)
        ttft([rng.randrange(3, 500) for _ in range(8)])  # one step: vLLM frees blocks whose save ended
        llm.reset_prefix_cache()

    for _ in range(2):  # warm-up: first-call costs are not what we measure
        ttft([rng.randrange(3, 500) for _ in range(args.prefix // 4)])
    cold, cached, cached_tokens = [], [], []
    for _ in range(args.rounds):
        doc = [rng.randrange(3, 500) for _ in range(args.prefix)]
        q1, q2 = ([rng.randrange(3, 500) for _ in range(args.question)] for _ in range(2))
        t, _ = ttft(doc + q1)
        cold.append(t)
        settle(sched.scheduler.manager.key_fn(doc + q1) if sched else [])
        t, n = ttft(doc + q2)
        cached.append(t)
        cached_tokens.append(n)
    result = {"cold_ttft_s": cold, "cached_ttft_s": cached, "cached_tokens": cached_tokens}
    if worker is not None:
        result["fetch"] = worker.stats()
    return result


def _row(name: str, r: dict) -> tuple:
    med = statistics.median
    return (name, med(r["cold_ttft_s"]) * 1e3, med(r["cached_ttft_s"]) * 1e3, int(med(r["cached_tokens"])))


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``shadowserve bench vllm`` (the CLI adds ``--json``)."""
    p.add_argument("--prefix", type=int, default=4096, help="document tokens (cached prefix)")
    p.add_argument("--question", type=int, default=32, help="tokens after the document")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--model", help="HF model dir (default: a random Llama built here)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--fetch-mode", default="offload", choices=["offload", "thread", "sync"])
    p.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset of: " + ", ".join(CONFIGS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--store-url", help=argparse.SUPPRESS)
    p.add_argument("--child-config", help=argparse.SUPPRESS)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.add_argument("--json", dest="json_path", metavar="FILE", help="write the numbers printed to this file")
    return run(p.parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """Every configuration in its own vLLM process against one store server; prints the table."""
    if args.child_config is not None:
        print("RESULT " + json.dumps(_child(args)), flush=True)
        return 0
    try:
        import vllm  # noqa: F401  (only the children use it; fail here with the install hint)
    except ImportError as exc:
        raise ConfigError("shadowserve bench vllm needs vLLM: pip install -e '.[vllm]' "
                          "(see docs/vllm.md)") from exc
    if args.prefix < CHUNK_TOKENS:
        raise ConfigError(f"--prefix {args.prefix} is shorter than one stored chunk ({CHUNK_TOKENS} tokens): "
                          "nothing could be loaded")
    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown or not names:
        raise ConfigError(f"unknown --configs {', '.join(unknown) or '(none)'}: choose from {', '.join(CONFIGS)}")

    from shadowserve.integrations.vllm.random_model import save_random_llama
    from shadowserve.store.launch import start_store_server

    tmp = tempfile.mkdtemp(prefix="ss-vllm-bench-")
    model = args.model or str(save_random_llama(
        os.path.join(tmp, "model"), num_layers=args.layers, hidden_size=args.hidden,
        num_heads=args.hidden // 128, num_kv_heads=args.hidden // 128, intermediate_size=3 * args.hidden,
        max_position_embeddings=args.prefix + 256))
    results: dict[str, dict] = {}
    srv = start_store_server()
    try:
        for name in names:
            cmd = [sys.executable, "-m", "shadowserve.integrations.vllm.bench", "--child-config",
                   json.dumps(CONFIGS[name]), "--store-url", srv.url, "--model", model,
                   *(f"--{k}={v}" for k, v in (("prefix", args.prefix), ("question", args.question),
                                               ("rounds", args.rounds), ("dtype", args.dtype),
                                               ("fetch-mode", args.fetch_mode), ("seed", args.seed)))]
            out = subprocess.run(cmd, capture_output=True, text=True)
            line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if line is None:
                sys.stderr.write(out.stderr[-4000:])
                raise SystemExit(f"configuration {name!r} failed (exit {out.returncode})")
            results[name] = json.loads(line[len("RESULT "):])
    finally:
        srv.stop()
    base = statistics.median(results[names[0]]["cached_ttft_s"]) if names else 1.0
    print(f"TTFT of a {args.prefix}-token document + {args.question}-token question, median of {args.rounds} "
          f"rounds ({args.dtype}, {args.layers} layers x {args.hidden}, fetch mode {args.fetch_mode})")
    print(f"{'configuration':<22} {'cold ms':>9} {'cached ms':>10} {'cached tokens':>14} {'vs ' + names[0]:>10}")
    for name in names:
        n, cold, cached, tokens = _row(name, results[name])
        print(f"{n:<22} {cold:>9.0f} {cached:>10.0f} {tokens:>14d} {base / (cached / 1e3):>9.2f}x")
    if args.json_path:
        skip = ("child_config", "store_url", "json_path", "_suite_run", "command", "suite")
        with open(args.json_path, "w") as f:
            json.dump({"args": {k: v for k, v in vars(args).items() if k not in skip and not callable(v)},
                       "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
