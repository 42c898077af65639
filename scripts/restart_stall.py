"""How long the engine stalls when its data plane is killed under a decoding batch.

A batch decodes in an ``offload`` engine (the benchmarks' core split: engine on its core, data plane on
the reserved one); after a few steps the data-plane process is SIGKILLed. The engine notices, restarts
the plane and keeps decoding. Printed: the longest step after the kill, the step that restarted the
plane, the median step, and how long the new process took to become ready. Since session 17 a restart
does not wait for the new interpreter (1-3 s), so the longest step should be an ordinary one.

    python scripts/restart_stall.py --model smollm2-135m --batch 8 --tokens 120 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import time

from shadowserve.bench.common.harness import Harness, doc_prompt, load_for
from shadowserve.engine.request import SamplingParams
from shadowserve.kvcache.levels import codec_for_quality
from shadowserve.store.launch import start_store_server


def _ready(backend) -> bool:
    """The backend's ``ready`` (before session 17 a restart returned only once the plane was ready)."""
    return getattr(backend, "ready", lambda: True)()


def one_round(h: Harness, prompts: list[list[int]], tokens: int) -> dict:
    eng = h.engine("offload")
    try:
        manager = eng.kv_manager
        reqs = [eng.add_request(p, SamplingParams(max_tokens=tokens, ignore_eos=True)) for p in prompts]
        for _ in range(10):  # prefill and a few decode steps
            eng.step()
        time.sleep(manager.config.heartbeat_timeout)  # an idle dead plane is restarted only this long after the last
        os.kill(manager.backend.process.pid, signal.SIGKILL)
        killed = time.monotonic()
        steps, restart_step, ready_after = [], None, None
        while any(not r.is_finished for r in reqs):
            t = time.perf_counter()
            eng.step()
            steps.append(time.perf_counter() - t)
            if restart_step is None and manager.stats.dataplane_restarts:
                restart_step = len(steps) - 1
            if restart_step is not None and ready_after is None and _ready(manager.backend):
                ready_after = time.monotonic() - killed
        return {"longest_step_ms": max(steps) * 1e3, "restart_step_ms": steps[restart_step] * 1e3
                if restart_step is not None else None, "median_step_ms": statistics.median(steps) * 1e3,
                "ready_after_kill_s": ready_after, "restarts": manager.stats.dataplane_restarts}
    finally:
        eng.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--tokens", type=int, default=120, help="tokens each request decodes")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", dest="json_path")
    args = p.parse_args()
    loaded = load_for(args)
    server = start_store_server()
    try:
        h = Harness(loaded, server.url, codec_for_quality("balanced"))
        prompts = [doc_prompt(loaded.tokenizer, 256, offset=7 * i) for i in range(args.batch)]
        rows = []
        for i in range(args.rounds):
            row = one_round(h, prompts, args.tokens)
            rows.append(row)
            if row["restart_step_ms"] is None or row["ready_after_kill_s"] is None:
                print(f"round {i + 1}: the batch finished before the plane was back; decode longer (--tokens)")
                continue
            print(f"round {i + 1}: longest step {row['longest_step_ms']:.0f} ms, the restarting step "
                  f"{row['restart_step_ms']:.0f} ms, median {row['median_step_ms']:.1f} ms; new plane ready "
                  f"{row['ready_after_kill_s']:.2f} s after the kill", flush=True)
    finally:
        server.stop()
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump({"model": args.model, "batch": args.batch, "rounds": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
