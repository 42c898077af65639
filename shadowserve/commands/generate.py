"""``shadowserve generate``: one prompt in, text (or a JSON record with timings) out."""

from __future__ import annotations

import argparse
import json

from shadowserve.config import DTYPES, LINEAR_KERNELS


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m", help="registry name, .gguf file or HF model dir")
    p.add_argument("--prompt", required=True, help="the prompt text")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--dtype", default="float32", help=f"one of {', '.join(DTYPES)}")
    p.add_argument("--linear-kernel", default="auto",
                   help=f"weight matmuls: one of {', '.join(LINEAR_KERNELS)} (auto: packed fp16 for float32 on CPU)")
    p.add_argument("--json", action="store_true", help="print one JSON object with text, token ids and timings")


def run(args: argparse.Namespace) -> int:
    from shadowserve.engine.request import SamplingParams
    from shadowserve.llm import LLM

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            seed=args.seed)
    llm = LLM(args.model, dtype=args.dtype, linear_kernel=args.linear_kernel, progress=not args.json)
    prompt = args.prompt
    if args.chat:
        prompt = llm.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
    out = llm.generate([prompt], params)[0]
    if args.json:
        print(json.dumps({
            "text": out.text,
            "token_ids": out.token_ids,
            "prompt_token_ids": out.prompt_token_ids,
            "ttft_ms": out.ttft_ms,
            "tpot_ms": out.tpot_ms,
            "finish_reason": out.finish_reason,
        }))
    else:
        print(out.text)
    llm.close()
    return 0
