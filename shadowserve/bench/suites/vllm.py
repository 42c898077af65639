"""vLLM with ShadowServeConnector vs vLLM alone: TTFT of a cached prefix, and decode TPOT under load.

    shadowserve bench vllm --prefix 4096 --rounds 5 [--loaded] [--passes 2] [--json FILE]

Each configuration runs in its own process (vLLM's KV connector is process-global), against one
store server started here, on a random-weight Llama built here (outputs meaningless, timings real).
vLLM's local prefix cache is off, as on a replica that never saw the prefix: a prefix is either
loaded by the connector or computed. Per round a fresh document of ``--prefix`` tokens is asked a
first question (cold: computed, and saved by the connector) and then a second question (the
document is now only in the store). TTFT is the wall time of a ``max_tokens=1`` generate.

``--loaded`` adds the interference measurement of #5 inside vLLM: the TPOT of a decoding batch
alone, then while requests over other stored documents arrive back to back. vLLM computes on the
engine cores and the connector's data plane runs on the data-plane cores in every configuration.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from shadowserve.config import DataPlaneConfig
from shadowserve.cores import pin_to_dataplane_cores
from shadowserve.errors import ConfigError
from shadowserve.integrations.vllm.random_model import save_random_llama
from shadowserve.store import open_store
from shadowserve.store.launch import start_store_server

CHUNK_TOKENS = 256  # the connector's default chunk_size: only whole chunks are stored
LOCAL = "vllm local"  # no connector; the documents already in vLLM's own prefix cache (the floor for --loaded)
CONFIGS = {
    "vllm": None,  # no connector: every prefix is computed
    LOCAL: None,
    "shadowserve lossless": {"quant": "none", "lossless": "zstd"},
    "shadowserve rms": {"quant": "rms", "lossless": "zstd"},
    # The same codec with the pipeline elsewhere (not in the default set): on threads of vLLM's
    # process, or run while vLLM's step waits. Side by side with the above for --loaded.
    "shadowserve rms thread": {"quant": "rms", "lossless": "zstd", "fetch_mode": "thread"},
    "shadowserve rms sync": {"quant": "rms", "lossless": "zstd", "fetch_mode": "sync"},
}
DEFAULT_CONFIGS = ("vllm", "shadowserve lossless", "shadowserve rms")


def _child(args: argparse.Namespace) -> dict:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    # Fairness, as in our own benchmarks: vLLM computes on the engine cores in every configuration;
    # the data-plane cores (where the connector's pipeline runs) play the SmartNIC.
    # The split is made before pinning, and the connector is told its cores explicitly: "auto" inside
    # a process pinned to the engine cores would reserve one of those.
    engine_cores, plane_cores = DataPlaneConfig().split_cores()
    os.sched_setaffinity(0, engine_cores)
    torch.set_num_threads(len(engine_cores))
    extra = json.loads(args.child_config)
    kvt = None
    if extra is not None:
        extra = {"store_url": args.store_url, "fetch_mode": args.fetch_mode,
                 "dataplane_cores": ",".join(map(str, plane_cores)), **extra}
        kvt = KVTransferConfig(kv_connector="ShadowServeConnector", kv_role="kv_both",
                               kv_connector_module_path="shadowserve.integrations.vllm",
                               kv_connector_extra_config=extra)
    llm = LLM(args.model, enforce_eager=True, dtype=args.dtype,
              max_model_len=max(args.prefix, args.load_prefix if args.loaded else 0) + 256,
              kv_transfer_config=kvt, enable_prefix_caching=args.child_name == LOCAL)
    one = SamplingParams(max_tokens=1, temperature=0.0)
    rng = random.Random(args.seed)

    def ttft(prompt: list[int]) -> tuple[float, int]:
        t0 = time.perf_counter()
        out = llm.generate([{"prompt_token_ids": prompt}], one, use_tqdm=False)[0]
        return time.perf_counter() - t0, out.num_cached_tokens or 0

    worker = sched = store = None
    if kvt is not None:
        from vllm.distributed.kv_transfer import get_kv_transfer_group

        worker = get_kv_transfer_group()
        sched = llm.llm_engine.engine_core.engine_core.scheduler.connector
        store = open_store(args.store_url)

    def settle(keys: list[bytes]) -> None:
        """Saves landed (and any local copy dropped): the next hit can only be the store."""
        deadline = time.monotonic() + 120
        while worker is not None and (worker.worker.backend.saving or not all(store.contains(keys))):
            if time.monotonic() > deadline:
                raise RuntimeError("saves did not land within 120 s")
            worker.worker.collect()
            time.sleep(0.005)
        ttft([rng.randrange(3, 500) for _ in range(8)])  # one step: vLLM frees blocks whose save ended
        if args.child_name != LOCAL:  # LOCAL keeps its copy: its second question is a local hit
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
    if args.loaded:
        docs = [[rng.randrange(3, 500) for _ in range(args.load_prefix)] for _ in range(args.load_docs)]
        if worker is not None or args.child_name == LOCAL:
            # Every document computed once: saved to the store (and vLLM's copy dropped, so loads come
            # from the store), or, for LOCAL, kept in vLLM's prefix cache.
            llm.generate([{"prompt_token_ids": d} for d in docs], one, use_tqdm=False)
            if worker is not None:
                settle([k for d in docs for k in sched.scheduler.manager.key_fn(d)])
        decoders = [[rng.randrange(3, 500) for _ in range(64)] for _ in range(args.batch)]
        decode = SamplingParams(max_tokens=args.decode_tokens, temperature=0.0, ignore_eos=True)
        engine = llm.llm_engine
        decode_tpot(engine, decoders[:2], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
        result["idle"] = decode_tpot(engine, decoders, decode)
        arrivals = (docs[i % len(docs)] + [rng.randrange(3, 500) for _ in range(args.question)]
                    for i in itertools.count())
        result["loaded"] = decode_tpot(engine, decoders, decode, arrivals, args.fetchers, one, args.arrival_every)
    if worker is not None:
        result["fetch"] = worker.stats()
    return result


def decode_tpot(engine, prompts: list[list[int]], params, arrivals=None, in_flight: int = 0,
                arrival_params=None, every: int = 0) -> dict:
    """TPOT of a batch decoding in ``engine`` (vLLM's LLMEngine), stepped here one step at a time.

    With ``arrivals`` (an iterator of prompts): one arrives every ``every`` steps, the same schedule
    in every configuration (so a configuration whose arrivals end sooner is not handed more); or,
    with ``every`` = 0, ``in_flight`` of them are kept running, each replaced as soon as it ends.
    """
    tag = f"{time.monotonic_ns()}"
    batch = {f"decode-{tag}-{i}" for i in range(len(prompts))}
    for rid, prompt in zip(sorted(batch), prompts):  # outputs carry the id given (add_request returns an internal one)
        engine.add_request(rid, {"prompt_token_ids": prompt}, params)
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    tokens: dict[str, int] = {}
    others: set[str] = set()
    arrived, cached = 0, []

    def top_up(step: int) -> None:
        nonlocal arrived
        if arrivals is not None and every and step % every == 0:
            rid = f"arrival-{tag}-{arrived}"
            engine.add_request(rid, {"prompt_token_ids": next(arrivals)}, arrival_params)
            others.add(rid)
            arrived += 1
        while arrivals is not None and not every and len(others) < in_flight:
            rid = f"arrival-{tag}-{arrived}"
            engine.add_request(rid, {"prompt_token_ids": next(arrivals)}, arrival_params)
            others.add(rid)
            arrived += 1

    done: set[str] = set()
    step = 0
    while done != batch:
        top_up(step)
        step += 1
        outputs = engine.step()
        now = time.perf_counter()
        for out in outputs:
            rid = out.request_id
            if rid in batch:
                n = len(out.outputs[0].token_ids)
                if n > tokens.get(rid, 0):
                    tokens[rid] = n
                    first.setdefault(rid, now)
                    last[rid] = now
                if out.finished:
                    done.add(rid)
            elif rid in others and out.finished:
                others.discard(rid)
                cached.append(out.num_cached_tokens or 0)
    while others:  # let the arrivals still running end before the next measurement
        for out in engine.step():
            if out.request_id in others and out.finished:
                others.discard(out.request_id)
    tpot = statistics.mean((last[r] - first[r]) / (tokens[r] - 1) for r in batch)
    return {"tpot_ms": tpot * 1e3, "arrivals_finished": len(cached), "arrival_cached_tokens": cached}


def _merge(passes: list[dict]) -> dict:
    """One configuration's passes as one record: TTFT samples pooled, the rest per pass."""
    out: dict = {k: [v for p in passes for v in p[k]] for k in ("cold_ttft_s", "cached_ttft_s", "cached_tokens")}
    for key in ("idle", "loaded", "fetch"):
        if key in passes[0]:
            out[key] = [p[key] for p in passes]
    return out


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
    p.add_argument("--configs", default=",".join(DEFAULT_CONFIGS), help="comma-separated, of: " + ", ".join(CONFIGS))
    p.add_argument("--loaded", action="store_true",
                   help="also: TPOT of a decoding batch alone and while long-prefix requests arrive back to back")
    p.add_argument("--batch", type=int, default=8, help="--loaded: decoding requests")
    p.add_argument("--decode-tokens", type=int, default=64, help="--loaded: tokens each decodes")
    p.add_argument("--load-prefix", type=int, default=2048, help="--loaded: document tokens of each arrival")
    p.add_argument("--load-docs", type=int, default=16,
                   help="--loaded: distinct documents (each saved first); arrivals cycle through them")
    p.add_argument("--arrival-every", type=int, default=4,
                   help="--loaded: one arrival every N engine steps (the same schedule for every configuration)")
    p.add_argument("--fetchers", type=int, default=2, help="--loaded with --arrival-every 0: arrivals kept in flight")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--passes", type=int, default=1,
                   help="runs of every configuration, taking turns (machine drift lands on all alike)")
    p.add_argument("--store-url", help=argparse.SUPPRESS)
    p.add_argument("--child-config", help=argparse.SUPPRESS)
    p.add_argument("--child-name", help=argparse.SUPPRESS)


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
    for flag in ("prefix", "load_prefix"):
        if getattr(args, flag) < CHUNK_TOKENS:
            raise ConfigError(f"--{flag.replace('_', '-')} {getattr(args, flag)} is shorter than one stored chunk "
                              f"({CHUNK_TOKENS} tokens): nothing could be loaded")
    for flag, least in (("rounds", 1), ("passes", 1), ("batch", 1), ("decode_tokens", 2), ("load_docs", 1),
                        ("fetchers", 1), ("arrival_every", 0)):
        if getattr(args, flag) < least:
            raise ConfigError(f"--{flag.replace('_', '-')} must be >= {least}, got {getattr(args, flag)}")
    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown or not names:
        raise ConfigError(f"unknown --configs {', '.join(unknown) or '(none)'}: choose from {', '.join(CONFIGS)}")

    tmp = tempfile.mkdtemp(prefix="ss-vllm-bench-")
    model = args.model or str(save_random_llama(
        os.path.join(tmp, "model"), num_layers=args.layers, hidden_size=args.hidden,
        num_heads=args.hidden // 128, num_kv_heads=args.hidden // 128, intermediate_size=3 * args.hidden,
        max_position_embeddings=max(args.prefix, args.load_prefix) + 256))
    passes: dict[str, list[dict]] = {name: [] for name in names}
    srv = start_store_server()
    pin_to_dataplane_cores(srv.pid)  # the store plays a remote machine: off vLLM's cores
    flags = ("prefix", "question", "rounds", "dtype", "fetch_mode", "seed", "batch", "decode_tokens",
             "load_prefix", "load_docs", "fetchers", "arrival_every")
    try:
        for n in range(args.passes):  # configurations take turns; every other pass in reverse order
            for name in names if n % 2 == 0 else names[::-1]:
                # Documents of their own per run (random tokens, same lengths): one configuration's
                # saves must not turn another's cold question into a hit.
                seed = args.seed + 1000 * n + names.index(name)
                cmd = [sys.executable, "-m", "shadowserve.bench.suites.vllm", "--child-config",
                       json.dumps(CONFIGS[name]), "--child-name", name, "--store-url", srv.url, "--model", model,
                       *(f"--{k.replace('_', '-')}={getattr(args, k)}" for k in flags if k != "seed"),
                       f"--seed={seed}",
                       *(["--loaded"] if args.loaded else [])]
                out = subprocess.run(cmd, capture_output=True, text=True)
                line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
                if line is None:
                    sys.stderr.write(out.stderr[-4000:])
                    raise SystemExit(f"configuration {name!r} failed (exit {out.returncode})")
                passes[name].append(json.loads(line[len("RESULT "):]))
                print(f"  pass {n + 1}: {name} done", flush=True)
    finally:
        srv.stop()
    results = {name: _merge(ps) for name, ps in passes.items()}
    base = statistics.median(results[names[0]]["cached_ttft_s"]) if names else 1.0
    print(f"TTFT of a {args.prefix}-token document + {args.question}-token question, median of {args.rounds} "
          f"rounds ({args.dtype}, {args.layers} layers x {args.hidden}, fetch mode {args.fetch_mode} unless the configuration names its own)")
    print(f"{'configuration':<22} {'cold ms':>9} {'cached ms':>10} {'cached tokens':>14} {'vs ' + names[0]:>10}")
    for name in names:
        n, cold, cached, tokens = _row(name, results[name])
        print(f"{n:<22} {cold:>9.0f} {cached:>10.0f} {tokens:>14d} {base / (cached / 1e3):>9.2f}x")
    if args.loaded:
        pace = f"one every {args.arrival_every} steps" if args.arrival_every else f"{args.fetchers} in flight"
        print(f"\nTPOT of {args.batch} requests decoding {args.decode_tokens} tokens, alone and while "
              f"{args.load_prefix}-token-prefix requests arrive ({pace}); median of {args.passes} pass(es)")
        floor = (statistics.median(lo["tpot_ms"] for lo in results[LOCAL]["loaded"]) if LOCAL in results else None)
        print(f"{'configuration':<22} {'idle ms':>9} {'loaded ms':>10} {'ratio':>7} {'vs local':>9} {'arrivals':>9} "
              f"{'arrival cached tokens':>22}")
        for name in names:
            r = results[name]
            ratios = [lo["tpot_ms"] / i["tpot_ms"] for i, lo in zip(r["idle"], r["loaded"])]
            loaded_ms = statistics.median(lo["tpot_ms"] for lo in r["loaded"])
            cached_tokens = [c for lo in r["loaded"] for c in lo["arrival_cached_tokens"]]
            print(f"{name:<22} {statistics.median(i['tpot_ms'] for i in r['idle']):>9.1f} {loaded_ms:>10.1f} "
                  f"{statistics.median(ratios):>7.2f} {loaded_ms / floor if floor else float('nan'):>9.2f} "
                  f"{sum(lo['arrivals_finished'] for lo in r['loaded']):>9d} "
                  f"{statistics.mean(cached_tokens) if cached_tokens else 0:>22.0f}")
    if args.json_path:
        skip = ("child_config", "store_url", "json_path", "_suite_run", "command", "suite")
        with open(args.json_path, "w") as f:
            json.dump({"args": {k: v for k, v in vars(args).items() if k not in skip and not callable(v)},
                       "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
