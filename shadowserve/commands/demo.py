"""``shadowserve demo``: the main job end to end on the embedded default store and the real model.

Starts a local store server, answers long-document questions on SmolLM2-135M without any remote
cache (``recompute``), then once more to save every document's KV to the store (the cold pass),
and then in each fetch mode with a fresh engine, so every question's document is fetched from the
store instead of computed. Prints TTFT/TPOT per mode and how many answers match ``recompute``.
"""

from __future__ import annotations

import argparse

MODES = ("sync", "thread", "offload")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--store", default=None, help="store URL (default: start a local store server)")
    p.add_argument("--documents", type=int, default=2, help="number of documents")
    p.add_argument("--questions", type=int, default=3, help="questions per document")
    p.add_argument("--doc-tokens", type=int, default=1024, help="approximate tokens per document")
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--modes", default=",".join(MODES), help="fetch modes to run after the cold pass")
    p.add_argument("--quant", default=None, help="codec quantization (default: the default codec's)")
    p.add_argument("--lossless", default=None, help="codec lossless stage (default: the default codec's)")
    p.add_argument("--key-step", type=float, default=None,
                   help="rms codec: key step as a multiple of the token's RMS (default 0.5; smaller is finer)")
    p.add_argument("--value-step", type=float, default=None, help="rms codec: value step (default 1.0)")
    p.add_argument("--layer-steps", default=None,
                   help="rms codec: comma-separated step multipliers, one per layer (default: 1 everywhere)")


def run(args: argparse.Namespace) -> int:
    import statistics

    from shadowserve.bench.workloads import long_document_qa
    from shadowserve.config import CodecConfig, DataPlaneConfig, EngineConfig
    from shadowserve.engine.engine import LLMEngine
    from shadowserve.engine.sequence import SamplingParams
    from shadowserve.errors import ConfigError
    from shadowserve.model.loader import load_model
    from shadowserve.store.launch import start_store_server

    modes = [m for m in args.modes.split(",") if m]
    for m in modes:
        if m not in MODES:
            raise ConfigError(f"unknown demo mode {m!r}: choose from {', '.join(MODES)}")
    overrides = {k: v for k, v in (("quant", args.quant), ("lossless", args.lossless), ("key_step", args.key_step),
                                   ("value_step", args.value_step), ("layer_steps", args.layer_steps)) if v}
    codec = CodecConfig(**overrides)
    loaded = load_model(args.model, "float32")
    prompts = long_document_qa(loaded.tokenizer, args.documents, args.questions, args.doc_tokens)
    params = SamplingParams(max_tokens=args.max_tokens)
    engine_cfg = EngineConfig(model=args.model, kv_cache_memory="1GiB", enable_prefix_caching=False)
    server = None if args.store else start_store_server("--capacity", "4GiB")
    url = args.store or server.url
    print(f"store: {url}   model: {args.model}   {len(prompts)} questions over {args.documents} "
          f"documents of ~{args.doc_tokens} tokens   codec: {codec_name(codec)}")

    def one_pass(mode: str, label: str):
        dp = DataPlaneConfig(fetch_mode=mode, pin_cores=True)
        eng = LLMEngine(engine_cfg, loaded=loaded, dataplane=dp, store_url=None if mode == "recompute" else url,
                        codec=codec)
        try:
            reqs = [eng.add_request(p, params) for p in prompts]
            from tqdm import tqdm

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
          f"{'same answer':>12} {'same prefix':>12}")
    for name, reqs in rows:
        ttft = statistics.mean(r.ttft for r in reqs) * 1e3
        tpots = [r.tpot for r in reqs if r.tpot is not None]
        tpot = statistics.mean(tpots) * 1e3 if tpots else float("nan")
        fetches = [r.fetch_seconds for r in reqs if r.fetch_seconds is not None]
        fetch_part = f"{statistics.mean(fetches) * 1e3:.1f}" if fetches else "-"
        fetched = sum(r.num_fetched_tokens for r in reqs) / sum(len(r.prompt_token_ids) for r in reqs)
        same = sum(r.output_token_ids == t for r, t in zip(reqs, ref_tokens)) / len(reqs)
        prefix = statistics.mean(agreed_prefix(r.output_token_ids, t) for r, t in zip(reqs, ref_tokens))
        print(f"{name:<24} {ttft:>12.1f} {fetch_part:>12} {tpot:>12.1f} {fetched:>8.0%} {same:>12.0%} {prefix:>12.0%}")
    answer = loaded.tokenizer.decode(reference[0].output_token_ids).strip()
    print(f"\nexample answer: {answer!r}")
    print("of it fetch: mean time the requests that fetched spent in FETCHING (until a step saw their KV landed); "
          "same answer: token for token equal to recompute's; same prefix: mean share of recompute's answer "
          "reproduced before the first differing token")
    return 0


def codec_name(codec) -> str:
    steps = f" (key step {codec.key_step}, value step {codec.value_step}" if codec.quant == "rms" else ""
    if steps:
        steps += ", per-layer multipliers)" if codec.layer_steps else ")"
    return f"{codec.quant}+{codec.lossless}{steps}"


def agreed_prefix(got: list[int], want: list[int]) -> float:
    """Share of ``want`` that ``got`` reproduces before they first differ (1.0: identical)."""
    n = 0
    for a, b in zip(got, want):
        if a != b:
            break
        n += 1
    return n / max(1, len(want)) if got != want else 1.0
