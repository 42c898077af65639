"""Prefill after cached context on the CPU: its cost, and how well the policy's prefill fits predict it.

Computing the rest of a prompt after ``k`` fetched chunks is a prefill with context. For each document
length this times, with both CPU attention paths (one call under the whole mask; query blocks), the
bench tiers warm-up steps (misses of three lengths, a suffix after the whole document) and then the
rest of a prompt after several cached lengths (the cached prefix comes from the engine's local prefix
cache, so only that one step is timed). The attention-aware fit (``controlplane/prefill_fit.py``) and
a per-token fit, both trained on the warm-up steps, predict each. The two paths alternate per length.

    python scripts/prefill_context_timing.py --doc-tokens 1024,4096 --json docs/prefill-context-timing.json
"""

from __future__ import annotations

import argparse
import json
import time

from shadowserve.bench.common.harness import doc_prompt, run_to_end
from shadowserve.config import DataPlaneConfig, EngineConfig
from shadowserve.controlplane.prefill_fit import PrefillFit
from shadowserve.engine.engine import LLMEngine
from shadowserve.engine.remote_kv import pairs_of
from shadowserve.engine.request import SamplingParams
from shadowserve.model import attention
from shadowserve.model.loader import load_model

PATHS = {"one masked call": 1 << 30, "query blocks": attention.PREFILL_QUERY_BLOCK}


class StepTimer:
    """Times the one model step of a request whose prefix is already cached locally."""

    def __init__(self, eng: LLMEngine) -> None:
        self.eng, self.steps = eng, []
        run = eng.runner.run

        def timed(chunks):
            t = time.perf_counter()
            out = run(chunks)
            self.steps.append((chunks[0].num_tokens, chunks[0].request.num_computed_tokens, time.perf_counter() - t))
            return out

        eng.runner.run = timed

    def step(self, prompt: list[int], cached: int) -> tuple[int, int, float]:
        if cached:  # put the prefix in the local prefix cache (whole blocks of it)
            run_to_end(self.eng, [self.eng.add_request(prompt[: cached + 1], SamplingParams(max_tokens=1))])
        self.steps.clear()
        run_to_end(self.eng, [self.eng.add_request(prompt, SamplingParams(max_tokens=1))])
        (n, s, sec), = self.steps
        assert s == cached, f"expected {cached} cached tokens, found {s}"
        return n, s, sec


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--doc-tokens", default="1024,4096")
    p.add_argument("--rows", type=int, default=3, help="cached lengths per document, spread over it")
    p.add_argument("--json")
    args = p.parse_args()
    loaded = load_model(args.model, "float32", device="cpu", progress=False)
    tok = loaded.tokenizer
    eng = LLMEngine(EngineConfig(model=loaded.name, kv_cache_memory="2GiB", enable_prefix_caching=True,
                                 max_num_batched_tokens=8192), loaded=loaded, progress=False,
                    dataplane=DataPlaneConfig(fetch_mode="recompute", pin_cores=True))
    timer = StepTimer(eng)
    out: dict = {"model": loaded.name, "lengths": []}
    offset = 100
    try:
        for length in (int(x) for x in args.doc_tokens.split(",")):
            chunks = length // 256
            cached = sorted({256 * max(1, round(chunks * (i + 1) / (args.rows + 1))) for i in range(args.rows)})
            entry: dict = {"doc_tokens": length, "paths": {}}
            for path, block in PATHS.items():
                attention.PREFILL_QUERY_BLOCK = block
                docs = []
                for _ in range(4 + len(cached)):  # fresh text for every timed step: no prefix-cache hits
                    docs.append(doc_prompt(tok, length, offset=offset, suffix="\n\nQ: why?"))
                    offset += 7
                full = len(docs[0])
                train = [timer.step(docs[0][: full // 4], 0), timer.step(docs[1][: full // 2], 0),
                         timer.step(docs[2], 0), timer.step(docs[2][:length] + tok.encode("\n\nQ: how?"), length)]
                fit, per_token = PrefillFit(), PrefillFit()
                for n, s, sec in train:
                    fit.add(n, sec, pairs_of(n, s), s + n)
                    per_token.add(n, sec)
                rows = []
                for doc, c in zip(docs[4:], cached):
                    n, s, sec = timer.step(doc, c)
                    rows.append({"cached": s, "tokens": n, "measured_ms": sec * 1e3,
                                 "attention_fit_ms": fit.predict(n, s) * 1e3,
                                 "per_token_fit_ms": per_token.predict(n, s) * 1e3})
                entry["paths"][path] = {"train": [{"tokens": n, "cached": s, "ms": sec * 1e3} for n, s, sec in train],
                                        "fit": fit.coefficients(), "rows": rows}
                print(f"{length} tokens, {path}: fit (step s, token s, pair s, kv s) = {fit.coefficients()}")
                for r in rows:
                    print(f"  {r['tokens']:>5} after {r['cached']:>5}: measured {r['measured_ms']:8.0f} ms, "
                          f"attention fit {r['attention_fit_ms']:8.0f} ({r['attention_fit_ms'] / r['measured_ms'] - 1:+.1%}), "
                          f"per-token fit {r['per_token_fit_ms']:8.0f} ({r['per_token_fit_ms'] / r['measured_ms'] - 1:+.1%})")
            out["lengths"].append(entry)
    finally:
        attention.PREFILL_QUERY_BLOCK = PATHS["query blocks"]
        eng.close()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
