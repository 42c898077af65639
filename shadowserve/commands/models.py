"""``shadowserve models list|pull|tokenizer``: what names exist, fetching real weights ahead of time, and
writing a model's tokenizer as an HF directory for clients that tokenize on their side."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="models_cmd", metavar="ACTION", required=True)
    sub.add_parser("list", help="list known model names")
    pull = sub.add_parser("pull", help="download a model's weights into the cache")
    pull.add_argument("name")
    tok = sub.add_parser("tokenizer", help="write a model's tokenizer as an HF directory (tokenizer.json + "
                                           "tokenizer_config.json), e.g. for vllm bench serve --tokenizer DIR")
    tok.add_argument("name", help="model name or path")
    tok.add_argument("dir", help="directory to write")


def run(args: argparse.Namespace) -> int:
    from shadowserve.errors import ModelError
    from shadowserve.model.registry import MODELS
    from shadowserve.model.weights_download import SMOLLM2_MEMBER, cache_dir, smollm2_gguf_path

    if args.models_cmd == "tokenizer":
        from shadowserve.model.loader import load_model

        loaded = load_model(args.name, progress=True)
        print(loaded.tokenizer.save_pretrained(args.dir, loaded.max_model_len))
        return 0
    if args.models_cmd == "list":
        width = max(len(n) for n in MODELS)
        for name, spec in MODELS.items():
            if spec.source == "smollm2-gguf":
                state = "cached" if (cache_dir() / name / SMOLLM2_MEMBER).exists() else "not downloaded"
            else:
                state = "built on load"
            print(f"{name:<{width}}  {state:<14}  {spec.description}")
        return 0
    spec = MODELS.get(args.name)
    if spec is None:
        raise ModelError(f"unknown model {args.name!r}: use one of {', '.join(MODELS)}")
    if spec.source == "random":
        print(f"{args.name} has random weights built on load; nothing to download")
        return 0
    print(smollm2_gguf_path(progress=True))
    return 0
