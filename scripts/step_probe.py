"""What a quality level's answer KL is made of, by re-quantizing its planes in variants the codec lacks.

The real codec fixes one scale per token row of each (layer, K/V) plane. This script re-implements that
quantizer in a few lines (same rules, steps, channel and head multipliers, 127-level bound, fp16 scales,
taken from the level's own ``Layout``) and then varies it: a scale per (token, head) instead of per
token, planes left exact, the keys' or values' steps (or one plane's) multiplied. Each variant is
scored like ``answer_sensitivity.py codecs`` (answer-token KL against recompute, teacher-forced, and the
share of identical answers) on bench quality's tasks. Its rate is an estimate, from the symbols'
order-0 entropy per plane and chunk (keys relative to their channel medians, as packed) plus 16 bits per
scale: comparable between variants, ~9% above the real chunk's ratio. ``row`` is the real quantizer's
estimate; ``real`` is the actual codec. A probe for choosing experiments; bench quality decides.

    python scripts/step_probe.py --seed 10 --documents 16 --task needle \
        --variants "{'row': {}, 'head-keys': {'per_head': 'k'}, 'K exact': {'exact': 'k'}, 'v x0.7': {'v': 0.7}}"

A variant is a dict: ``per_head`` ('k', 'v' or 'kv'), ``exact`` ('k', 'v', or a list of [layer, kv]
planes), ``k`` / ``v`` (multiply every key / value step), ``planes`` (a list of [layer, kv, multiplier]),
``facts`` (multiply the step of every token row inside the document's fact sentences, keys and values:
an oracle for spending bits on the tokens a question will ask about, which the codec cannot know).
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
import time

import torch
from answer_sensitivity import FINGERPRINT, Answers, coded, compare, forced

from shadowserve.bench.common.quality_tasks import TaskBuilder, TaskSpec
from shadowserve.bench.suites.codec import _load, _prefill, resolve_preset
from shadowserve.kvcache.codec import KVCodec
from shadowserve.model.loader import load_model


def _entropy_bits(q: torch.Tensor) -> float:
    """Order-0 entropy of ``q``'s symbols, in bits for all of them."""
    counts = torch.unique(q, return_counts=True)[1].double()
    return float(-(counts * (counts / counts.sum()).log2()).sum())


def _is_exact(exact, layer: int, kv: int) -> bool:
    if exact in ("k", "v"):
        return kv == "kv".index(exact)
    return [layer, kv] in [list(p) for p in exact or ()]


def fact_rows(tokenizer, ids: list[int]) -> torch.Tensor:
    """Bool [tokens]: the rows of bench quality's fact sentences ("The secret code of the red door is
    48213.", "The red door is guarded by the owl.", "The owl knows the code 48213.") in ``ids``."""
    pieces = [tokenizer.decode([i]) for i in ids]
    rows = torch.zeros(len(ids), dtype=torch.bool)
    for i, piece in enumerate(pieces):
        if piece.strip() != "The":
            continue
        end = next((j for j in range(i, min(i + 20, len(ids))) if "." in pieces[j]), i)
        sentence = "".join(pieces[i:end + 1])
        if any(m in sentence for m in ("secret code of the", "is guarded by the", "knows the code")):
            rows[i:end + 1] = True
    return rows


def requantize(codec: KVCodec, kv: torch.Tensor, variant: dict, chunk: int = 256,
               facts: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
    """``kv`` [layers, 2, tokens, heads, head_dim] through the variant's quantizer, and its estimated ratio.
    ``facts``: fact_rows of the document, for the ``facts`` variant."""
    layers, _, tokens, heads, head_dim = kv.shape
    row_steps = torch.ones(tokens)
    if "facts" in variant:
        row_steps[facts] = variant["facts"]
    out, bits = torch.empty_like(kv), 0.0
    per_head = variant.get("per_head", "")
    for t0 in range(0, tokens, chunk):
        x = kv[:, :, t0:t0 + chunk].reshape(layers, 2, -1, heads * head_dim).float()
        t = x.shape[2]
        layout = codec.layout_of((layers, 2, t, heads, head_dim))
        steps = layout.steps if layout.steps is not None else torch.ones(layers, 2, heads * head_dim)
        rms_steps = layout.rms_steps if layout.rms_steps is not None else steps
        param = torch.tensor([[r.param for r in pair] for pair in layout.rules])
        param *= torch.tensor([variant.get("k", 1.0), variant.get("v", 1.0)])
        for layer, kv_i, m in variant.get("planes", ()):
            param[layer, kv_i] *= m
        for layer in range(layers):
            for kv_i in range(2):
                if _is_exact(variant.get("exact"), layer, kv_i):
                    out[layer, kv_i, t0:t0 + t] = kv[layer, kv_i, t0:t0 + t]
                    bits += 16 * t * heads * head_dim
                    continue
                groups = heads if "kv"[kv_i] in per_head else 1  # scales per row: 1, or one per head
                a = (x[layer, kv_i] / steps[layer, kv_i]).view(t, groups, -1)
                r = (x[layer, kv_i] / rms_steps[layer, kv_i]).view(t, groups, -1)
                rms = r.square().mean(-1).sqrt() * row_steps[t0:t0 + t, None]
                s = torch.maximum(rms * param[layer, kv_i], a.abs().amax(-1) / 127)
                s = s.clamp_min(2.0**-24).half().float()
                q = (a / s[..., None]).round().clamp(-127, 127)
                rec = (q * s[..., None]).view(t, -1) * steps[layer, kv_i]
                out[layer, kv_i, t0:t0 + t] = rec.view(t, heads, head_dim).to(kv.dtype)
                q = q.view(t, -1)
                if kv_i == 0:
                    q = q - q.median(0).values  # packed keys are stored relative to their channel's median
                bits += _entropy_bits(q.to(torch.int16)) + 16 * t * groups
    return out, kv.numel() * 16 / bits


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--level", default="balanced", help="bench codec preset whose layout is varied")
    p.add_argument("--variants", required=True, help="a Python dict literal: name -> variant (see above)")
    p.add_argument("--seed", type=int, default=10)
    p.add_argument("--documents", type=int, default=16)
    p.add_argument("--task", choices=["both", "needle", "chain"], default="needle")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    variants = ast.literal_eval(args.variants)
    loaded = load_model("smollm2-135m", "float32")
    needle = {"both": args.documents // 2, "needle": args.documents, "chain": 0}[args.task]
    spec = TaskSpec(needle_documents=needle, chain_documents=args.documents - needle, seed=args.seed)
    builder = TaskBuilder(loaded.tokenizer, spec)
    _, model = _load("smollm2-135m")
    config = resolve_preset(args.level)
    codec = KVCodec(config, FINGERPRINT)
    rows = {n: {"ratio": [], "kl": [], "identical": []} for n in ["real", *variants]}
    started = time.monotonic()
    for d, doc in enumerate(builder.documents()):
        kv = _prefill(model, torch.tensor([list(doc.prefix_ids)]))
        ref = Answers(model, builder, doc, kv)
        ref_lp = forced(model, kv, [h for hops in ref.hops for h in hops])
        facts = fact_rows(loaded.tokenizer, list(doc.prefix_ids))
        for name in rows:
            decoded, ratio = coded(config, kv) if name == "real" else requantize(codec, kv, variants[name], facts=facts)
            kls, same = compare(model, decoded, ref, ref_lp)
            rows[name]["ratio"].append(ratio)
            rows[name]["kl"] += kls
            rows[name]["identical"] += same
        print(f"document {d + 1}/{args.documents} ({time.monotonic() - started:.0f} s)", file=sys.stderr, flush=True)
    report = {"level": args.level, "seed": args.seed, "documents": args.documents, "task": args.task,
              "variants": variants, "results": {}}
    for name, row in rows.items():
        summary = {"ratio_vs_fp16": sum(row["ratio"]) / len(row["ratio"]), "answer_kl": sum(row["kl"]) / len(row["kl"]),
                   "identical_share": sum(row["identical"]) / len(row["identical"])}
        report["results"][name] = summary
        print(f"{name:24s} " + "  ".join(f"{k} {v:.5f}" for k, v in summary.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, default=list)
    return 0


if __name__ == "__main__":
    sys.exit(main())
