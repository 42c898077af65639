"""``shadowserve bench tiers``: the local compressed tier and the fetch-or-recompute policy, side by side.

reuse: long-document QA whose documents recur with Zipf-like popularity, the store behind an emulated
link. Mean TTFT without and with the local tier (same requests, same order), the tier's hit ratio,
and tokens held per GiB of tier against an uncompressed (fp16) tier of the same size. Beside them, the
ceiling of any tier: the same questions with every document already in the engine's own KV blocks
(no fetch, no decode; only the suffix is computed), so ``no_tier / resident`` bounds what a tier can
buy on this engine and link. The hit ratio
against tier size, for both admission rules, replays the same key sequence through ``LocalTier``
itself with the real compressed chunk sizes (cheap: no model runs).

policy: TTFT of a cached prefix against link rate for fetch-always, recompute-always and the chosen
policy (each engine warmed first: misses of three lengths time the prefill, one fetch the link).
"""

from __future__ import annotations

import argparse
import random
import statistics

import numpy as np

from shadowserve.bench.common.codec_flags import add_codec_arguments, codec_from_args
from shadowserve.bench.common.harness import (
    Harness,
    add_model_arguments,
    doc_prompt,
    load_for,
    run_to_end,
    store_url,
    write_json,
)
from shadowserve.controlplane.builder import chunk_key_fn
from shadowserve.cores import pin_to_dataplane_cores
from shadowserve.dataplane.local_tier import LocalTier, page_size_for
from shadowserve.engine.request import SamplingParams
from shadowserve.store import open_store
from shadowserve.store.launch import start_store_server
from shadowserve.values import parse_size

QUICK = dict(model="tiny-random", kv_cache_memory="64MiB", documents=6, doc_tokens=512, requests=16,
             tier="1MiB", bandwidths="0.01,20", policy_requests=2, mode="thread")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p, kv_cache_memory="2GiB")
    p.add_argument("--quick", action="store_true", help="tiny-random, a small grid: a smoke run in under a minute")
    p.add_argument("--mode", default="offload", help="fetch mode of every engine")
    p.add_argument("--documents", type=int, default=12)
    p.add_argument("--doc-tokens", type=int, default=1536, help="tokens per document (a chunk multiple)")
    p.add_argument("--requests", type=int, default=40, help="questions over the documents (Zipf popularity)")
    p.add_argument("--zipf", type=float, default=1.1, help="Zipf exponent of document popularity")
    p.add_argument("--tier", default="64MiB", help="local tier size in the reuse runs")
    p.add_argument("--reuse-bandwidth", type=float, default=1.0, help="link in the reuse runs, Gbit/s")
    p.add_argument("--bandwidths", default="0.01,0.05,0.2,1,5,20", help="link rates of the policy runs, Gbit/s")
    p.add_argument("--policy-requests", type=int, default=3, help="timed requests per policy row (mean TTFT)")
    add_codec_arguments(p)


def run(args: argparse.Namespace) -> int:
    if args.quick:
        for name, value in QUICK.items():
            setattr(args, name, value)
    loaded = load_for(args)
    server = start_store_server("--capacity", "8GiB")
    pin_to_dataplane_cores(server.pid)
    h = Harness(loaded, server.url, codec_from_args(args), kv_cache_memory=args.kv_cache_memory, device=args.device,
                workers=args.dataplane_workers, dataplane_cores=args.dataplane_cores)
    tok = loaded.tokenizer
    docs = [doc_prompt(tok, args.doc_tokens, offset=11 * i, suffix="") for i in range(args.documents + 2)]
    rng = random.Random(7)
    weights = [1 / (i + 1) ** args.zipf for i in range(args.documents)]
    order = rng.choices(range(args.documents), weights, k=args.requests)
    prompts = [docs[d] + tok.encode(f"\n\nQuestion {i}: what does this say?") for i, d in enumerate(order)]
    try:
        h.warm([docs[d] + tok.encode("\n\nQ") for d in range(args.documents)])
        reuse = _reuse(h, args, prompts, order, docs[: args.documents])
        policy = _policy(h, args, docs[0] + tok.encode("\n\nQ: why?"), docs[-1], docs[-2])
    finally:
        server.stop()
    write_json(args.json_path, {"model": loaded.name, "reuse": reuse, "policy": policy})
    return 0


def _mean_ttft_ms(eng, prompts: list[list[int]]) -> float:
    reqs = [run_to_end(eng, [eng.add_request(p, SamplingParams(max_tokens=1))])[0] for p in prompts]
    return statistics.mean(r.ttft for r in reqs) * 1e3


def _resident_ttft_ms(h: Harness, prompts: list[list[int]], docs: list[list[int]]) -> float:
    """Mean TTFT with each document's KV already in the engine's blocks (local prefix caching): a free tier."""
    eng = h.local_engine(enable_prefix_caching=True)
    try:
        run_to_end(eng, [eng.add_request(d, SamplingParams(max_tokens=1)) for d in docs])
        reqs = [run_to_end(eng, [eng.add_request(p, SamplingParams(max_tokens=1))])[0] for p in prompts]
        missed = sum(r.num_cached_tokens < len(docs[0]) for r in reqs)  # every document is doc_tokens long
        if missed:  # the KV pool could not keep every document: the figure would not be a ceiling
            raise RuntimeError(f"{missed} of {len(reqs)} questions missed the engine's prefix cache; "
                               "raise --kv-cache-memory to hold every document")
        return statistics.mean(r.ttft for r in reqs) * 1e3
    finally:
        eng.close()


def _reuse(h: Harness, args, prompts: list[list[int]], order: list[int], docs: list[list[int]]) -> dict:
    url = store_url(h.store_url, args.reuse_bandwidth)
    out: dict = {"bandwidth_gbps": args.reuse_bandwidth, "tier_bytes": parse_size(args.tier),
                 "requests": len(prompts), "documents": args.documents, "doc_tokens": args.doc_tokens}
    for label, size in (("no_tier", 0), ("tier", args.tier)):
        eng = h.engine(args.mode, store_url=url, local_tier=size, fetch_policy="always")
        try:
            out[f"ttft_ms_{label}"] = _mean_ttft_ms(eng, prompts)
            stats = eng.kv_manager.stats
            if size:
                hits, total = stats.fetched_chunks["tier"], sum(stats.fetched_chunks.values())
                out["hit_ratio"] = hits / total if total else 0.0
        finally:
            eng.close()
    out["ttft_ms_resident"] = _resident_ttft_ms(h, prompts, docs)
    out["tier_ceiling"] = out["ttft_ms_no_tier"] / out["ttft_ms_resident"]
    out.update(_capacity(h, args, prompts, order))
    print(f"reuse over {args.reuse_bandwidth:g} Gbit/s, {len(prompts)} questions on {args.documents} documents "
          f"(Zipf {args.zipf}): mean TTFT {out['ttft_ms_no_tier']:.0f} ms without the tier, "
          f"{out['ttft_ms_tier']:.0f} ms with {args.tier} ({out['ttft_ms_no_tier'] / out['ttft_ms_tier']:.2f}x); "
          f"tier hit ratio {out['hit_ratio']:.2f}")
    print(f"ceiling: {out['ttft_ms_resident']:.0f} ms with every document already in the engine's KV blocks, "
          f"so no tier can beat {out['tier_ceiling']:.2f}x here")
    print(f"tokens per GiB: {out['tokens_per_gib_tier']:,.0f} in the compressed tier vs "
          f"{out['tokens_per_gib_uncompressed']:,.0f} uncompressed fp16 "
          f"({out['tokens_per_gib_tier'] / out['tokens_per_gib_uncompressed']:.1f}x)")
    print(f"{'tier size':>10} " + " ".join(f"{'hit ' + r:>11}" for r in ("first", "second")))
    for row in out["hit_ratio_by_size"]:
        print(f"{row['tier_bytes'] / 2**20:>8.2f}Mi " + " ".join(f"{row[r]:>11.2f}" for r in ("first", "second")))
    return out


def _capacity(h: Harness, args, prompts: list[list[int]], order: list[int]) -> dict:
    """Tokens per GiB from the stored chunks' real sizes; hit ratio by tier size by replaying the keys."""
    keys_of = chunk_key_fn(h.loaded.fingerprint, h.codec, h.chunk_size)
    store = open_store(h.store_url)
    try:
        sizes = {}
        for p in prompts:
            for k in keys_of(p):
                if k not in sizes:
                    blob = store.get(k)
                    if blob is not None:
                        sizes[k] = len(blob)
    finally:
        store.close()
    arch = h.loaded.arch
    raw = arch.num_hidden_layers * 2 * h.chunk_size * arch.num_key_value_heads * arch.head_dim * 2  # fp16
    page = page_size_for(raw)
    stored = statistics.mean(-(-n // page) * page for n in sizes.values())  # pages a chunk really takes
    working = sum(-(-n // page) * page for n in sizes.values())
    rows = []
    for frac in (0.125, 0.25, 0.5, 1.0):
        row = {"tier_bytes": int(working * frac)}
        for rule in ("first", "second"):
            row[rule] = _replay(LocalTier(row["tier_bytes"], page, rule), [keys_of(p) for p in prompts], sizes)
        rows.append(row)
    return {"tokens_per_gib_tier": h.chunk_size * 2**30 / stored, "tokens_per_gib_uncompressed": h.chunk_size * 2**30 / raw,
            "working_set_bytes": working, "hit_ratio_by_size": rows}


def _replay(tier: LocalTier, requests: list[list[bytes]], sizes: dict[bytes, int]) -> float:
    """The tier's hit ratio over the requests' chunk fetches, in order (the engines' fetch sequence)."""
    hits = total = 0
    buf = np.zeros(max(sizes.values()), dtype=np.uint8)
    for keys in requests:
        for k in keys:
            if k not in sizes:
                continue
            total += 1
            if tier.get_into(k, buf) is not None:
                hits += 1
            else:
                tier.admit_fetched(k, buf[: sizes[k]])
    return hits / total if total else 0.0


def _policy(h: Harness, args, prompt: list[int], miss_doc: list[int], fetch_doc: list[int]) -> list[dict]:
    """Per link rate: mean TTFT of the cached prompt when always fetching, always computing, and deciding."""
    h.warm([fetch_doc])
    rows = []
    print(f"{'Gbit/s':>7} {'fetch ms':>9} {'recompute ms':>13} {'policy ms':>10} {'decision':>10} {'vs best':>8}")
    for gbps in [float(b) for b in args.bandwidths.split(",")]:
        row: dict = {"bandwidth_gbps": gbps}
        for label, policy in (("fetch", "always"), ("recompute", "never"), ("policy", "auto")):
            eng = h.engine(args.mode, store_url=store_url(h.store_url, gbps), fetch_policy=policy)
            try:
                # Misses of three lengths time the prefill (a serving engine sees varied prompts; the
                # prefill fit takes a per-pair attention term only with a step shape to spare).
                for miss in (miss_doc[: len(miss_doc) // 4], miss_doc[: len(miss_doc) // 2], miss_doc):
                    run_to_end(eng, [eng.add_request(miss, SamplingParams(max_tokens=1))])
                run_to_end(eng, [eng.add_request(fetch_doc, SamplingParams(max_tokens=1))])  # times the link
                reqs = [run_to_end(eng, [eng.add_request(prompt, SamplingParams(max_tokens=1))])[0]
                        for _ in range(args.policy_requests)]
                row[f"ttft_{label}_ms"] = statistics.mean(r.ttft for r in reqs) * 1e3
                if policy == "auto":
                    row["decision"] = reqs[-1].kv_decision
            finally:
                eng.close()
        best = min(row["ttft_fetch_ms"], row["ttft_recompute_ms"])
        row["policy_vs_best"] = row["ttft_policy_ms"] / best
        print(f"{gbps:>7g} {row['ttft_fetch_ms']:>9.0f} {row['ttft_recompute_ms']:>13.0f} {row['ttft_policy_ms']:>10.0f} "
              f"{(row['decision'] or {}).get('decision', '-'):>10} {row['policy_vs_best']:>8.2f}")
        rows.append(row)
    return rows
