"""``shadowserve bench soak``: a live server under steady load while faults fire, judged answer by answer.

A real ``shadowserve serve`` child (offload data plane, lossless KV codec) and a real store server
child. Reference answers come first from a recompute-only server with the same settings: with
a lossless codec and greedy decoding, a fetched prefix must give exactly recompute's text, so
every answer can be checked. Then concurrent clients replay the long-document prompts (several
questions per document, so prefixes are shared and fetched) for ``--minutes`` while the data
plane is SIGKILLed, the store restarts, chunks are damaged and the store refuses writes, each
fault at least ``--rounds`` times. At the end, after the load drains, the server's KV blocks in
use, the shared-memory segments its process tree maps and its open descriptors are compared with
their values before the load.
"""

from __future__ import annotations

import argparse
import threading
import time
from collections import Counter

from shadowserve.bench.common.answer_client import complete, scrape_metrics
from shadowserve.bench.common.faults import FAULTS, STEADY, FaultInjector, StoreHandle, fault_schedule
from shadowserve.bench.common.harness import write_json
from shadowserve.bench.common.machine import machine_info
from shadowserve.bench.common.proc_tree import fd_targets, shm_segments
from shadowserve.bench.common.soak_report import Record, format_report, judge, records_json, summarize
from shadowserve.bench.common.workloads import int_range, long_doc_qa
from shadowserve.controlplane.builder import chunk_key_fn
from shadowserve.errors import ShadowServeError
from shadowserve.kvcache.levels import QUALITY_LEVELS
from shadowserve.model.loader import load_model
from shadowserve.server.launch import start_api_server
from shadowserve.store import open_store

WARMUP = "warm-up"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m", help="tiny-random for a quick check")
    p.add_argument("--minutes", type=float, default=10.0, help="how long the load runs while faults fire")
    p.add_argument("--rounds", type=int, default=2, help="times each fault fires")
    p.add_argument("--concurrency", type=int, default=4, help="clients, each with one request in flight")
    p.add_argument("--num-documents", type=int, default=4)
    p.add_argument("--questions-per-doc", type=int, default=3)
    p.add_argument("--doc-tokens", type=int_range, default=(600, 1400), help="document length range LO:HI")
    p.add_argument("--output-len", type=int, default=16, help="tokens per answer (exact, greedy)")
    p.add_argument("--chunk-size", type=int, default=256, help="tokens per stored chunk")
    p.add_argument("--kv-cache-memory", default="1GiB")
    p.add_argument("--store-capacity", default="4GiB", help="the store's normal capacity")
    p.add_argument("--full-capacity", default="4KiB",
                   help="the store's capacity while it is 'full': below one chunk, so it refuses every PUT")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds without an answer that count as hung")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.SETTING=VALUE",
                   help="passed to both servers, e.g. dataplane.heartbeat_timeout=2 (repeatable)")


def run(args: argparse.Namespace) -> int:
    if args.rounds < 1 or args.minutes <= 0 or args.concurrency < 1:
        raise ShadowServeError("--minutes, --rounds and --concurrency must be positive")
    loaded = load_model(args.model, "float32", progress=False)
    loaded.model.use_linear_kernel("auto")  # the server's choice: it names the KV, so it seeds the keys
    workload = long_doc_qa(loaded.tokenizer, args.num_documents, args.questions_per_doc, args.doc_tokens,
                           (args.output_len, args.output_len), args.seed)
    prompts = [list(s.prompt_ids) for s in workload.specs]
    key_fn = chunk_key_fn(loaded.fingerprint, QUALITY_LEVELS["lossless"], args.chunk_size)
    keys = list(dict.fromkeys(k for p in prompts for k in key_fn(p)))
    del loaded

    store = StoreHandle(args.store_capacity)
    flags = ["--model", args.model, "--store", store.url, "--kv-quality", "lossless",
             "--kv-cache-memory", args.kv_cache_memory, "--set", f"dataplane.chunk_size={args.chunk_size}",
             # Local prefix caching off: a repeated prompt must take the fetch path, not reuse local blocks.
             "--set", "engine.enable_prefix_caching=false", "--set", "server.log_level=warning",
             # Every hit fetched: the faults target the fetch path, which the cost policy may skip on a fast model.
             "--set", "dataplane.fetch_policy=always"]
    for item in args.overrides:
        flags += ["--set", item]
    try:
        print(f"{len(prompts)} prompts ({min(map(len, prompts))}-{max(map(len, prompts))} tokens, "
              f"{len(keys)} distinct chunks); reference answers from a recompute server", flush=True)
        references = _references(flags, prompts, args)
        report = _soak(flags, prompts, references, keys, store, args)
    finally:
        store.stop()
    print(report["table"])
    write_json(args.json_path, {k: v for k, v in report.items() if k != "table"} | {"machine": machine_info()})
    return 0


def _references(flags: list[str], prompts: list[list[int]], args: argparse.Namespace) -> list[str]:
    """Recompute's answers, one request at a time on a server that never touches the store."""
    server = start_api_server(*flags, "--fetch-mode", "recompute")
    try:
        out = []
        for p in prompts:
            ans = complete(server.url, p, args.output_len, args.timeout)
            if ans.text is None:
                raise ShadowServeError(f"the reference server did not answer: {ans.error}")
            out.append(ans.text)
        return out
    finally:
        server.stop()


def _soak(flags: list[str], prompts: list[list[int]], references: list[str], keys: list[bytes],
          store: StoreHandle, args: argparse.Namespace) -> dict:
    server = start_api_server(*flags, "--fetch-mode", "offload")
    records: list[Record] = []
    try:
        # One pass at full concurrency: the store holds every chunk and the server's pools are warm.
        t0 = time.monotonic()
        records += _drive(server.url, prompts, references, args, t0, t0, lambda: WARMUP, passes=1)
        _settle(server.url, args.timeout)
        if not any(_stored(store.url, keys)):
            raise ShadowServeError("none of the workload's chunk keys is in the store after the warm-up: "
                                   "the benchmark's key computation does not match the server's")
        start = _resources(server.url, server.pid, store.port)
        injector = FaultInjector(server.pid, store, keys, args.full_capacity, args.seed)
        duration = args.minutes * 60
        t0 = time.monotonic()
        injector.run(fault_schedule(duration, args.rounds), t0)
        records += _drive(server.url, prompts, references, args, t0, t0 + duration, lambda: injector.phase)
        injector.join()
        fired = injector.fired()
        _settle(server.url, args.timeout)
        end = _resources(server.url, server.pid, store.port, want=start)
        resources = {k: {"start": start[k], "end": end[k]} for k in start}
        metrics = scrape_metrics(server.url)
    finally:
        server.stop()
    # The server owns every segment its tree mapped: none may outlive it.
    seen = set(start["_shm_names"]) | set(end["_shm_names"])
    resources = {k: v for k, v in resources.items() if not k.startswith("_")}
    resources["shm_left_after_stop"] = {"start": 0, "end": sum(_exists(n) for n in seen)}
    # What the server's descriptors were, when their count changed: a leak report names the descriptor.
    fds_added = sorted((Counter(end["_fds"]) - Counter(start["_fds"])).elements())
    fds_closed = sorted((Counter(start["_fds"]) - Counter(end["_fds"])).elements())
    summary = summarize(records, [WARMUP, STEADY, *FAULTS])
    counters = {k.removeprefix("shadowserve_"): v for k, v in metrics.items()
                if any(s in k for s in ("fetch_failures", "fetched_tokens_total", "saved_chunks", "save_failures",
                                        "dataplane_restarts", "requests_total"))}
    return {
        "table": format_report(summary, resources, fired) + "\n" + _events_text(injector.events),
        "command_args": {k: v for k, v in vars(args).items() if not k.startswith("_") and k != "json_path"},
        "summary": summary, "resources": resources,
        "fds_added": fds_added, "fds_closed": fds_closed, "faults_fired": fired, "server_counters": counters,
        "fault_events": [vars(e) for e in injector.events], "records": records_json(records),
    }


def _drive(url: str, prompts: list[list[int]], references: list[str], args: argparse.Namespace,
           t0: float, until: float, phase, passes: int = 0) -> list[Record]:
    """``args.concurrency`` clients send the prompts in turn, each offset from the others, until
    ``until`` (or ``passes`` full passes); each answer is judged against its reference."""
    out: list[Record] = []
    lock = threading.Lock()
    n = len(prompts)

    def client(i: int) -> None:
        k = i
        while (k < passes * n) if passes else time.monotonic() < until:
            idx = k % n
            name = phase()
            ans = complete(url, prompts[idx], args.output_len, args.timeout)
            rec = Record(name, idx, round(ans.start - t0, 3), ans.seconds, judge(ans, references[idx]),
                         ans.fetched_tokens, ans.error)
            with lock:
                out.append(rec)
            k += args.concurrency

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(args.concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sorted(out, key=lambda r: r.start_s)


def _settle(url: str, timeout: float) -> None:
    """Wait until no request is in the engine and no KV block is held (saves land, fetches end)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = scrape_metrics(url)
        busy = sum(v for k, v in m.items() if k.startswith("shadowserve_requests_in_state"))
        if not busy and m.get("shadowserve_kv_blocks_used", 0) == 0:
            return
        time.sleep(0.5)


def _resources(url: str, pid: int, store_port: int, want: dict | None = None, grace: float = 15.0) -> dict:
    """KV blocks in use, shared-memory segments of the process tree, descriptors of the server.

    The server's connections to the store are counted apart from its other descriptors: they are
    a pool that grows to the peak number of overlapping store calls (at most ``POOL_SIZE`` idle),
    so their count may rise between two looks without anything leaking.
    With ``want`` (the starting values), sample again for up to ``grace`` seconds while they are
    above it: closing sockets and a restarted data plane settle a moment after the last answer.
    """
    deadline = time.monotonic() + grace
    to_store = f"->:{store_port} ESTABLISHED"
    while True:
        names = shm_segments(pid)
        blocks = int(scrape_metrics(url).get("shadowserve_kv_blocks_used", -1))
        # The scrape's own connection may still be open on the server's side: the fewest of a few looks.
        looks = [_fds_after(pid, i * 0.1) for i in range(4)]
        fds = min(looks, key=len)
        store_conns = sum(t.endswith(to_store) for t in fds)
        now = {"kv_blocks_used": blocks, "shm_segments": len(names), "open_fds": len(fds) - store_conns,
               "store_connections": store_conns, "_shm_names": sorted(names), "_fds": fds}
        if want is None or time.monotonic() > deadline or all(now[k] <= want[k] for k in
                                                               ("kv_blocks_used", "shm_segments", "open_fds")):
            return now
        time.sleep(0.5)


def _fds_after(pid: int, delay: float) -> list[str]:
    time.sleep(delay)
    return fd_targets(pid)


def _stored(url: str, keys: list[bytes]) -> list[bool]:
    store = open_store(url)
    try:
        return store.contains(keys)
    finally:
        store.close()


def _exists(path: str) -> bool:
    try:
        open(path, "rb").close()
        return True
    except OSError:
        return False


def _events_text(events) -> str:
    return "\n".join(f"  t={e.at_s:>7.1f}s {e.fault:<15} {e.action:<5} {'ok ' if e.ok else 'ERR'} {e.detail}"
                     for e in events)
