"""``shadowserve bench engine``: prefill and decode throughput, ours vs HF transformers, one run.

Both sides use the same weights (SmolLM2 GGUF dequantized to float32), the same prompts and the
same torch thread count, and run alternately in one process so machine noise hits both alike.
"""

from __future__ import annotations

import argparse
import json
import time
from pydoc_data.topics import topics

import torch

from shadowserve.config import EngineConfig
from shadowserve.engine.engine import LLMEngine
from shadowserve.engine.request import SamplingParams
from shadowserve.errors import ConfigError
from shadowserve.model.loader import load_model
from shadowserve.model.weights_download import smollm2_gguf_path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--prefill-lengths", default="512,2048,8000", help="prompt lengths in tokens")
    p.add_argument("--batch-sizes", default="1,8,32", help="decode batch sizes")
    p.add_argument("--decode-tokens", type=int, default=32, help="tokens generated per sequence")
    p.add_argument("--decode-prompt", type=int, default=128, help="prompt tokens per decoding sequence")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    p.add_argument("--repeats", type=int, default=2, help="best of N for each measurement")
    p.add_argument("--no-hf", action="store_true", help="skip the transformers baseline")
    p.add_argument("--kernels", default="auto,dense",
                   help="our weight-matmul kernels to measure side by side (auto, dense, fp16)")


def _text_ids(tokenizer, n: int, offset: int = 0) -> list[int]:
    keys = sorted(topics)
    ids: list[int] = []
    for i in range(len(keys)):
        ids.extend(tokenizer.encode(topics[keys[(offset + i) % len(keys)]]))
        if len(ids) >= n:
            return ids[:n]
    raise ValueError(f"pydoc topics hold fewer than {n} tokens")


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.decode_tokens < 2:
        raise SystemExit("--decode-tokens must be at least 2: decode is timed after each sequence's first token")
    lengths = [int(x) for x in args.prefill_lengths.split(",") if x]
    batches = [int(x) for x in args.batch_sizes.split(",") if x]
    loaded = load_model(args.model, "float32")
    engine = LLMEngine(EngineConfig(model=args.model, kv_cache_memory="2GiB", enable_prefix_caching=False,
                                    max_num_batched_tokens=8192), loaded=loaded)
    kernels = []
    for k in (x for x in args.kernels.split(",") if x):
        loaded.model.use_linear_kernel(k)
        kernels.append(loaded.model.linear_kernel)
    kernels = list(dict.fromkeys(kernels))  # "auto" may resolve to one already listed
    hf = None if args.no_hf else _hf_model(args.model)

    def ours(fn, *a) -> dict[str, float]:
        """Seconds per measurement for each of our kernels, run one after another on the same engine."""
        out = {}
        for k in kernels:
            loaded.model.use_linear_kernel(k)
            out[k] = best(fn, *a)
        return out

    def ours_prefill(ids: list[int]) -> float:
        req = engine.add_request(ids, SamplingParams(max_tokens=1))
        while engine.has_unfinished():
            engine.step()
        return req.ttft

    def ours_decode(prompts: list[list[int]]) -> float:
        """Seconds per decode step of the whole batch, timed once every prompt is prefilled.

        Long prompts take several chunked-prefill steps; timing from each request's first token
        would count the other prompts' prefill steps as decode.
        """
        sp = SamplingParams(max_tokens=args.decode_tokens, ignore_eos=True)
        reqs = [engine.add_request(p, sp) for p in prompts]
        while any(not r.output_token_ids for r in reqs):
            engine.step()
        before = sum(len(r.output_token_ids) for r in reqs)
        t = time.perf_counter()
        while engine.has_unfinished():
            engine.step()
        produced = sum(len(r.output_token_ids) for r in reqs) - before
        return (time.perf_counter() - t) * len(reqs) / produced

    def hf_prefill(ids: list[int]) -> float:
        x = torch.tensor([ids])
        t = time.perf_counter()
        with torch.inference_mode():
            hf(x, use_cache=True)
        return time.perf_counter() - t

    def hf_decode(prompts: list[list[int]]) -> float:
        """Seconds per decode step, from per-step timestamps (a stopping criterion that never stops)."""
        import transformers

        class Clock(transformers.StoppingCriteria):
            def __init__(self) -> None:
                self.times: list[float] = []

            def __call__(self, input_ids, scores, **kwargs):
                self.times.append(time.perf_counter())
                return torch.zeros(input_ids.shape[0], dtype=torch.bool)

        clock = Clock()
        with torch.inference_mode():
            hf.generate(torch.tensor(prompts), max_new_tokens=args.decode_tokens, min_new_tokens=args.decode_tokens,
                        do_sample=False, pad_token_id=0, eos_token_id=None,
                        stopping_criteria=transformers.StoppingCriteriaList([clock]))
        # times[0] is right after the prefill's token; the gaps after it are decode steps, as our TPOT.
        return (clock.times[-1] - clock.times[0]) / (len(clock.times) - 1)

    def best(fn, *a) -> float:
        return min(fn(*a) for _ in range(args.repeats))

    rows = []
    for n in lengths:
        ids = _text_ids(loaded.tokenizer, n)
        secs = ours(ours_prefill, ids)
        theirs = n / best(hf_prefill, ids) if hf else None
        rows.append({"phase": "prefill", "size": n, "ours_tok_s": {k: n / s for k, s in secs.items()},
                     "hf_tok_s": theirs})
        _print_row(rows[-1])
    for b in batches:
        prompts = [_text_ids(loaded.tokenizer, args.decode_prompt, offset=7 * i) for i in range(b)]
        secs = ours(ours_decode, prompts)
        theirs = b / best(hf_decode, prompts) if hf else None
        rows.append({"phase": "decode", "size": b, "ours_tok_s": {k: b / s for k, s in secs.items()},
                     "hf_tok_s": theirs})
        _print_row(rows[-1])
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump({"model": args.model, "threads": torch.get_num_threads(), "kernels": kernels,
                       "cpu": torch.backends.cpu.get_cpu_capability(), "rows": rows}, f, indent=2)
    engine.close()
    return 0


def _print_row(row: dict) -> None:
    """One line per measurement: each of our kernels, HF, and ours/HF per kernel (header on first call)."""
    what = f"{row['phase']} {'prompt' if row['phase'] == 'prefill' else 'batch'} {row['size']}"
    hf = row["hf_tok_s"]
    ours = row["ours_tok_s"]
    if not getattr(_print_row, "header", False):
        cells = [f"{'ours ' + k:>12}" for k in ours] + [f"{'HF':>10}"] + [f"{k + '/HF':>10}" for k in ours]
        print(f"{'tokens/s':<24} " + " ".join(cells))
        _print_row.header = True
    cells = [f"{v:12.1f}" for v in ours.values()] + [f"{hf:10.1f}" if hf else f"{'-':>10}"]
    cells += [f"{v / hf:9.2f}x" if hf else f"{'-':>10}" for v in ours.values()]
    print(f"{what:<24} " + " ".join(cells), flush=True)


def _hf_model(name: str):
    try:
        import transformers
    except ImportError:
        raise ConfigError("the transformers baseline needs `pip install transformers` (or pass --no-hf)") from None
    if name != "smollm2-135m":
        raise ConfigError("the transformers baseline is wired for smollm2-135m only (or pass --no-hf)")
    path = smollm2_gguf_path()
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
