"""``shadowserve demo``: the main job end to end on the embedded default store and the real model.

Starts a local store server, answers long-document questions with gold answers (secret codes hidden
in real prose, bench/common/quality_tasks.py) on SmolLM2-135M without any remote cache (``recompute``),
then once more to save every document's KV to the store (the cold pass), and then in each fetch mode
with a fresh engine, so every question's document is fetched from the store instead of computed.
Prints TTFT/TPOT per pass, task accuracy against the gold answers, and how many answers match
``recompute`` token for token (which a lossy codec need not do to be right).
"""

from __future__ import annotations

import argparse

from shadowserve.kvcache.levels import DEFAULT_QUALITY, QUALITY_LEVELS, codec_for_quality, quality_of

MODES = ("sync", "thread", "offload")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m", help="registry name, .gguf file or HF model dir")
    p.add_argument("--store", default=None, help="store URL (default: start a local store server)")
    p.add_argument("--documents", type=int, default=2, help="number of documents")
    p.add_argument("--questions", type=int, default=4, help="questions (hidden codes) per document, 1-16")
    p.add_argument("--doc-tokens", type=int, default=1024,
                   help="tokens per document, rounded down to whole 256-token chunks")
    p.add_argument("--max-tokens", type=int, default=8, help="most tokens per answer (a code takes about 7)")
    p.add_argument("--seed", type=int, default=0, help="seed of the documents, codes and questions")
    p.add_argument("--modes", default=",".join(MODES), help="fetch modes to run after the cold pass")
    p.add_argument("--kv-quality", default=DEFAULT_QUALITY, choices=list(QUALITY_LEVELS),
                   help="KV codec by quality level; the raw codec flags below override it")
    p.add_argument("--quant", default=None, help="codec quantization (default: the quality level's)")
    p.add_argument("--lossless", default=None, help="codec lossless stage (default: the default codec's)")
    p.add_argument("--key-step", type=float, default=None,
                   help="rms codec: key step as a multiple of the token's RMS (default 0.5; smaller is finer)")
    p.add_argument("--value-step", type=float, default=None, help="rms codec: value step (default 1.0)")
    p.add_argument("--layer-steps", default=None,
                   help="rms codec: comma-separated step multipliers, one per layer (default: 1 everywhere)")


def run(args: argparse.Namespace) -> int:
    import statistics

    from tqdm import tqdm

    from shadowserve.bench.common.quality_tasks import TaskBuilder, TaskSpec, is_correct
    from shadowserve.config import DataPlaneConfig, EngineConfig
    from shadowserve.engine.request import SamplingParams
    from shadowserve.errors import ConfigError
    from shadowserve.llm import create_engine
    from shadowserve.model.loader import load_model
    from shadowserve.store.launch import start_store_server

    modes = [m for m in args.modes.split(",") if m]
    for m in modes:
        if m not in MODES:
            raise ConfigError(f"unknown demo mode {m!r}: choose from {', '.join(MODES)}")
    if args.documents < 1 or not 1 <= args.questions <= 16 or args.doc_tokens < 256:
        raise ConfigError("--documents must be >= 1, --questions in 1..16 and --doc-tokens >= 256")
    overrides = {k: v for k, v in (("quant", args.quant), ("lossless", args.lossless), ("key_step", args.key_step),
                                   ("value_step", args.value_step), ("layer_steps", args.layer_steps)) if v}
    codec = codec_for_quality(args.kv_quality, **overrides)
    loaded = load_model(args.model, "float32")
    spec = TaskSpec(needle_documents=args.documents, chain_documents=0, chunks_per_document=args.doc_tokens // 256,
                    needles=args.questions, seed=args.seed)
    builder = TaskBuilder(loaded.tokenizer, spec)
    questions = [(doc, q) for doc in builder.documents() for q in doc.questions]
    prompts = [builder.prompt(doc, q.ask, q.primer) for doc, q in questions]
    params = SamplingParams(max_tokens=args.max_tokens)
    engine_cfg = EngineConfig(model=args.model, kv_cache_memory="1GiB", enable_prefix_caching=False)
    server = None if args.store else start_store_server("--capacity", "4GiB")
    url = args.store or server.url
    print(f"store: {url}   model: {args.model}   {len(prompts)} questions over {args.documents} "
          f"documents of {spec.chunks_per_document * 256} tokens   kv quality: {quality_of(codec) or 'custom'} "
          f"(codec {codec_name(codec)})")

    def one_pass(mode: str, label: str):
        dp = DataPlaneConfig(fetch_mode=mode, pin_cores=True)
        eng = create_engine(engine_cfg, loaded=loaded, dataplane=dp, store_url=None if mode == "recompute" else url,
                            codec=codec)
        try:
            reqs = [eng.add_request(p, params) for p in prompts]
            with tqdm(total=len(reqs), desc=label, unit="req", leave=False) as bar:
                while eng.has_unfinished():
                    bar.update(len(eng.step()))
            eng.flush()
            return reqs
        finally:
            eng.close()

    try:
        rows = []
        reference = one_pass("recompute", "recompute")
        rows.append(("recompute", reference))
        rows.append(("cold (saves to store)", one_pass("offload", "cold pass")))
        for mode in modes:
            rows.append((f"{mode} (fetches)", one_pass(mode, mode)))
    finally:
        if server is not None:
            server.stop()

    ref_tokens = [r.output_token_ids for r in reference]
    print(f"\n{'pass':<24} {'mean TTFT ms':>12} {'of it fetch':>12} {'mean TPOT ms':>12} {'fetched':>8} "
          f"{'accuracy':>9} {'same answer':>12}")
    for name, reqs in rows:
        ttft = statistics.mean(r.ttft for r in reqs) * 1e3
        tpots = [r.tpot for r in reqs if r.tpot is not None]
        tpot = statistics.mean(tpots) * 1e3 if tpots else float("nan")
        fetches = [r.fetch_seconds for r in reqs if r.fetch_seconds is not None]
        fetch_part = f"{statistics.mean(fetches) * 1e3:.1f}" if fetches else "-"
        fetched = sum(r.num_fetched_tokens for r in reqs) / sum(len(r.prompt_token_ids) for r in reqs)
        right = sum(is_correct(q, loaded.tokenizer.decode(r.output_token_ids)) for (_, q), r in zip(questions, reqs))
        same = sum(r.output_token_ids == t for r, t in zip(reqs, ref_tokens)) / len(reqs)
        print(f"{name:<24} {ttft:>12.1f} {fetch_part:>12} {tpot:>12.1f} {fetched:>8.0%} {right / len(reqs):>9.0%} "
              f"{same:>12.0%}")
    _, q = questions[0]
    answer = loaded.tokenizer.decode(reference[0].output_token_ids).strip()
    print(f"\nexample: {q.ask!r} -> {q.primer} {answer!r} (gold {q.gold})")
    print("of it fetch: mean time the requests that fetched spent in FETCHING (until a step saw their KV landed); "
          "accuracy: share of answers naming the right hidden code; same answer: token for token equal to "
          "recompute's (a lossy codec can change the wording and still be right: accuracy is the yardstick, "
          "and `shadowserve bench quality` measures it on 1000+ questions with intervals)")
    return 0


def codec_name(codec) -> str:
    steps = f" (key step {codec.key_step}, value step {codec.value_step}" if codec.quant == "rms" else ""
    if steps:
        steps += ", per-layer multipliers" if codec.layer_steps else ""
        steps += ", per-channel key steps" if codec.key_channel_steps else ""
        steps += ", finer retrieval heads)" if codec.head_steps else ")"
    return f"{codec.quant}+{codec.lossless}{steps}"


