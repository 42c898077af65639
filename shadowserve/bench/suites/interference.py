"""``shadowserve bench interference``: how much fetching slows the decoding of *other* requests.

A batch of requests decodes; we measure its TPOT with no fetch traffic, then while other requests
fetch long cached prefixes back to back, for each fetch mode, in one run. The engine computes on the
same cores in every mode; the data-plane cores play the SmartNIC and the engine never uses them.

A fetched request is not free once its KV has landed: it prefills its suffix over the whole context
in the engine, in every mode. To separate that from interference by the fetching itself, each mode's
run is *replayed*: the same requests join the batch at the same steps, but with their prefix already
in local KV blocks, so there is no fetch traffic at all. ``replay_ratio`` = loaded TPOT / replay TPOT.
"""

from __future__ import annotations

import argparse
import statistics

from shadowserve.bench.common.codec_flags import add_codec_arguments, codec_from_args
from shadowserve.bench.common.harness import (
    Harness,
    add_model_arguments,
    doc_prompt,
    itl_median_ms,
    load_for,
    run_to_end,
    write_json,
)
from shadowserve.cores import pin_to_dataplane_cores
from shadowserve.engine.request import SamplingParams
from shadowserve.store.launch import start_store_server


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--modes", default="sync,thread,offload")
    p.add_argument("--batch", type=int, default=8, help="decoding requests")
    p.add_argument("--decode-tokens", type=int, default=48)
    p.add_argument("--prefix-tokens", type=int, default=4096, help="cached prefix of each fetching request")
    p.add_argument("--fetchers", type=int, default=2, help="fetching requests kept in flight")
    p.add_argument("--store", default=None, help="store URL (default: a local store server)")
    p.add_argument("--rounds", type=int, default=3, help="rounds, modes interleaved; medians are reported")
    add_codec_arguments(p)


def _tpot(reqs) -> float:
    return statistics.mean(r.tpot for r in reqs)


def run(args: argparse.Namespace) -> int:
    loaded = load_for(args)
    server = None if args.store else start_store_server("--capacity", "16GiB")
    if server is not None:
        pin_to_dataplane_cores(server.pid)
    h = Harness(loaded, args.store or server.url, codec_from_args(args), kv_cache_memory=args.kv_cache_memory,
                device=args.device, workers=args.dataplane_workers, dataplane_cores=args.dataplane_cores,
                baseline_cores=args.baseline_cores)
    tok = loaded.tokenizer
    n_docs = 6
    docs = [doc_prompt(tok, args.prefix_tokens, offset=40 * i) for i in range(n_docs)]
    decoders = [doc_prompt(tok, 128, offset=400 + 3 * i) for i in range(args.batch)]
    decode_params = SamplingParams(max_tokens=args.decode_tokens, ignore_eos=True)
    results = {}
    try:
        h.warm(docs)
        print(f"{'mode':<14} {'TPOT idle ms':>13} {'TPOT loaded ms':>15} {'ratio':>7} "
              f"{'TPOT replay ms':>15} {'replay ratio':>13} {'fetches':>8}")
        rounds: dict[str, list[dict]] = {m: [] for m in args.modes.split(",")}
        for rnd in range(args.rounds):  # modes interleaved per round: slow drifts hit every mode alike
            for mode in rounds:
                r = _measure(h, mode, decoders, docs, decode_params, args.fetchers)
                rounds[mode].append(r)
                print(f"{mode:<14} {r['tpot_idle_ms']:>13.1f} {r['tpot_loaded_ms']:>15.1f} {r['ratio']:>7.2f} "
                      f"{r['tpot_replay_ms']:>15.1f} {r['replay_ratio']:>13.2f} {r['fetches']:>8}"
                      f"   (round {rnd + 1}; fetch job {r['fetch_job_ms_mean']:.0f} ms, failures "
                      f"{r['fetch_failures']}, restarts {r['dataplane_restarts']})", flush=True)
        print("medians over rounds:")
        for mode, rs in rounds.items():
            med = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
            results[mode] = {**med, "rounds": rs}
            print(f"{mode:<14} {med['tpot_idle_ms']:>13.1f} {med['tpot_loaded_ms']:>15.1f} {med['ratio']:>7.2f} "
                  f"{med['tpot_replay_ms']:>15.1f} {med['replay_ratio']:>13.2f} {med['fetches']:>8.0f}")
    finally:
        if server is not None:
            server.stop()
    write_json(args.json_path, {"model": args.model, "device": args.device, "dtype": args.dtype, "batch": args.batch, "prefix_tokens": args.prefix_tokens,
                                "modes": results})
    return 0


def _measure(h, mode, decoders, docs, decode_params, n_fetchers) -> dict:
    """Idle TPOT, loaded TPOT and the replayed baseline for one mode (one fresh engine)."""
    eng = h.engine(mode)
    try:
        # Warm-up, then the idle measurement: the batch decodes alone.
        run_batch(eng, decoders[:2], SamplingParams(max_tokens=4, ignore_eos=True))
        idle_reqs = run_batch(eng, decoders, decode_params)
        idle = _tpot(idle_reqs)
        # Loaded: the same batch while fetching requests keep arriving.
        reqs = [eng.add_request(p, decode_params) for p in decoders]
        fetchers, i, step = [], 0, 0
        landed_at: dict[str, int] = {}
        while any(not r.is_finished for r in reqs):
            live = [f for f in fetchers if not f.is_finished]
            while len(live) < n_fetchers:
                f = eng.add_request(docs[i % len(docs)], SamplingParams(max_tokens=1))
                fetchers.append(f)
                live.append(f)
                i += 1
            eng.step()
            step += 1
            for f in live:
                if f.request_id not in landed_at and f.num_computed_tokens > 0:
                    landed_at[f.request_id] = step
        loaded = _tpot(reqs)
        fetched = sum(1 for f in fetchers if f.num_fetched_tokens > 0)
        plane = eng.kv_manager.stats
        health = {"fetch_failures": plane.fetch_failures, "dataplane_restarts": plane.dataplane_restarts,
                  "fetch_job_ms_mean": plane.fetch_seconds / max(1, plane.fetches) * 1e3}
        itl_idle, itl_loaded = itl_median_ms(idle_reqs), itl_median_ms(reqs)
    finally:
        eng.close()
    schedule = sorted((landed_at[f.request_id], f.prompt_token_ids) for f in fetchers if f.request_id in landed_at)
    replay = _replay(h, decoders, decode_params, docs, schedule)
    return {"tpot_idle_ms": idle * 1e3, "tpot_loaded_ms": loaded * 1e3, "ratio": loaded / idle,
            "tpot_replay_ms": replay * 1e3, "replay_ratio": loaded / replay, "itl_p50_idle_ms": itl_idle,
            "itl_p50_loaded_ms": itl_loaded, "fetches": fetched, **health}


def _replay(h, decoders, decode_params, docs, schedule) -> float:
    """The same batch with the same requests joining at the same steps, their prefix already local."""
    eng = h.local_engine(enable_prefix_caching=True)
    try:
        run_batch(eng, docs, SamplingParams(max_tokens=1))  # every document's KV now in local blocks
        reqs = [eng.add_request(p, decode_params) for p in decoders]
        step, pending = 0, list(schedule)
        while any(not r.is_finished for r in reqs):
            while pending and pending[0][0] <= step + 1:
                eng.add_request(pending.pop(0)[1], SamplingParams(max_tokens=1))
            eng.step()
            step += 1
        return _tpot(reqs)
    finally:
        eng.close()


def run_batch(eng, prompts, params):
    return run_to_end(eng, [eng.add_request(p, params) for p in prompts])
