"""``shadowserve demo``: the main job on the real model.

Until the fetch path lands, it answers long-document questions on SmolLM2-135M, twice: the second
pass reuses the documents' KV from the engine's local prefix cache, which shows the TTFT gap that
fetching a cached prefix from the store is meant to close across machines.
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--documents", type=int, default=2, help="number of documents")
    p.add_argument("--questions", type=int, default=3, help="questions per document")
    p.add_argument("--doc-tokens", type=int, default=1024, help="approximate tokens per document")
    p.add_argument("--max-tokens", type=int, default=24)


def run(args: argparse.Namespace) -> int:
    import statistics

    from shadowserve.bench.workloads import long_document_qa
    from shadowserve.engine.sequence import SamplingParams
    from shadowserve.llm import LLM

    llm = LLM(args.model)
    prompts = long_document_qa(llm.tokenizer, args.documents, args.questions, args.doc_tokens)
    params = SamplingParams(max_tokens=args.max_tokens)
    rows = []
    for name in ("cold (computes every prefix)", "warm (prefix KV reused)"):
        outs = llm.generate(prompts, params, use_tqdm=True)
        ttft = [o.ttft_ms for o in outs]
        tpot = [o.tpot_ms for o in outs if o.tpot_ms is not None]
        cached = sum(o.num_cached_tokens for o in outs) / sum(len(o.prompt_token_ids) for o in outs)
        rows.append((name, statistics.mean(ttft), statistics.mean(tpot) if tpot else float("nan"), cached))
        if name.startswith("cold"):
            first = outs[0]
    print(f"\nmodel {args.model}: {len(prompts)} questions over {args.documents} documents "
          f"of ~{args.doc_tokens} tokens")
    print(f"{'pass':<30} {'mean TTFT ms':>13} {'mean TPOT ms':>13} {'prefix reused':>14}")
    for name, ttft, tpot, cached in rows:
        print(f"{name:<30} {ttft:>13.1f} {tpot:>13.1f} {cached:>13.0%}")
    print(f"\nexample answer: {first.text.strip()!r}")
    llm.close()
    return 0
