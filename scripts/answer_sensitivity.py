"""Where a lossy KV codec hurts gold-answer questions, measured in minutes instead of bench quality's hour.

Two commands, both on bench quality's tasks (``quality_tasks``, seeded) with SmolLM2-135M through HF
transformers (bench codec's reference path), each document's exact KV computed once:

* ``planes``: for every (layer, K/V) plane, the mean KL over the answer tokens of recompute's greedy
  answers (teacher-forced, every hop) with only that plane quantized at the default step. This is what
  fitted the ``qa`` schedules (docs/codec-task-fit.json, docs/codec.md "Steps fitted to answers").
* ``codecs``: per bench codec preset, its answer-token KL and the share of answers identical to
  recompute's. Teacher forcing on recompute's own greedy answer gives identity exactly: an answer is
  identical iff every answer token is still the argmax. ``--generate`` also answers greedily with the
  codec's KV and scores against the gold codes (slower).

A screening tool for choosing codecs; the verdict on a codec is bench quality's (the real engine and
data path, 1024 questions, paired statistics). Usage::

    python scripts/answer_sensitivity.py planes --seed 9 --documents 12 --json planes.json
    python scripts/answer_sensitivity.py codecs --seed 5 --documents 16 --codecs balanced,high
    python scripts/answer_sensitivity.py planes --per-head --task needle --seed 10 --documents 8

``codecs`` also reports the answer KL per task; ``--task`` keeps one task's documents only.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from transformers import DynamicCache

from shadowserve.bench.common.quality_runner import CODE_TOKENS, GUARD_TOKENS
from shadowserve.bench.common.quality_tasks import Document, TaskBuilder, TaskSpec, is_correct
from shadowserve.bench.suites.codec import _load, _prefill, resolve_preset
from shadowserve.kvcache import quant
from shadowserve.kvcache.codec import KVCodec
from shadowserve.kvcache.layout import Layout
from shadowserve.kvcache.plan import plan
from shadowserve.model.loader import load_model

FINGERPRINT = "bench:smollm2-135m:gguf-q4_1:float32"


def _cache(kv: torch.Tensor, batch: int = 1) -> DynamicCache:
    cache = DynamicCache()
    for layer in range(kv.shape[0]):
        k, v = (kv[layer, i].permute(1, 0, 2).unsqueeze(0).expand(batch, -1, -1, -1).contiguous() for i in (0, 1))
        cache.update(k, v, layer)
    return cache


@torch.no_grad()
def greedy(model, kv: torch.Tensor, suffixes: list[list[int]], n: int) -> list[list[int]]:
    """``n`` greedy tokens after each suffix, all suffixes at once (right-padded) on the shared KV."""
    b, p = len(suffixes), kv.shape[2]
    lens = torch.tensor([len(s) for s in suffixes])
    ids = torch.zeros(b, int(lens.max()), dtype=torch.long)
    mask = torch.zeros(b, p + ids.shape[1], dtype=torch.long)
    mask[:, :p] = 1
    for i, s in enumerate(suffixes):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, p:p + len(s)] = 1
    cache = _cache(kv, b)
    pos = (p + torch.arange(ids.shape[1])).expand(b, -1)
    logits = model(ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True).logits
    tok = logits[torch.arange(b), lens - 1].argmax(-1)
    out = [[int(t)] for t in tok]
    for step in range(1, n):
        mask = torch.cat([mask, torch.ones(b, 1, dtype=torch.long)], 1)
        logits = model(tok[:, None], attention_mask=mask, position_ids=(p + lens + step - 1)[:, None],
                       past_key_values=cache, use_cache=True).logits
        tok = logits[:, -1].argmax(-1)
        for i in range(b):
            out[i].append(int(tok[i]))
    return out


@torch.no_grad()
def forced(model, kv: torch.Tensor, hops: list[tuple[list[int], int]]) -> list[torch.Tensor]:
    """Log-probs over each hop's answer tokens (``seq[start:]``), teacher-forced, in one packed pass.

    The hops share one sequence with a block-diagonal causal mask, so the KV is not copied per hop.
    """
    p = kv.shape[2]
    lens = [len(seq) for seq, _ in hops]
    total = sum(lens)
    ids = torch.tensor([[t for seq, _ in hops for t in seq]])
    pos = torch.cat([p + torch.arange(n) for n in lens])[None]
    allowed = torch.zeros(total, p + total, dtype=torch.bool)
    allowed[:, :p] = True
    o = 0
    for n in lens:
        allowed[o:o + n, p + o:p + o + n] = torch.ones(n, n, dtype=torch.bool).tril()
        o += n
    mask = torch.zeros(1, 1, total, p + total).masked_fill_(~allowed, torch.finfo(torch.float32).min)
    logits = model(ids, attention_mask=mask, position_ids=pos, past_key_values=_cache(kv), use_cache=True).logits[0]
    out, o = [], 0
    for n, (_, start) in zip(lens, hops):
        out.append(torch.log_softmax(logits[o + start - 1: o + n - 1].float(), -1))
        o += n
    return out


class Answers:
    """Greedy answers to one document's questions on some KV: tokens per hop, and correctness."""

    def __init__(self, model, builder: TaskBuilder, doc: Document, kv: torch.Tensor) -> None:
        tok, skip = builder.tokenizer, len(doc.prefix_ids)
        qs = doc.questions
        firsts_in = [builder.prompt(doc, q.ask, q.primer)[skip:] for q in qs]
        firsts = greedy(model, kv, firsts_in, CODE_TOKENS if qs[0].task == "needle" else GUARD_TOKENS)
        hops = [q.second_hop(tok.decode(f)) for q, f in zip(qs, firsts)]
        seconds_in = [builder.prompt(doc, *h)[skip:] if h else [] for h in hops]
        seconds = greedy(model, kv, seconds_in, CODE_TOKENS) if hops[0] else [[] for _ in qs]
        self.hops = [[(a + b, len(a))] + ([(c + d, len(c))] if d else [])
                     for a, b, c, d in zip(firsts_in, firsts, seconds_in, seconds)]
        self.tokens = [f + s for f, s in zip(firsts, seconds)]
        self.correct = [is_correct(q, tok.decode(s or f)) for q, f, s in zip(qs, firsts, seconds)]


def compare(model, kv: torch.Tensor, ref: Answers, ref_lp: list[torch.Tensor]) -> tuple[list[float], list[bool]]:
    """Per question: mean answer-token KL(recompute || kv), and whether the greedy answer is unchanged."""
    flat = [h for hops in ref.hops for h in hops]
    lp = forced(model, kv, flat)
    kls, same, i = [], [], 0
    for hops in ref.hops:
        k = torch.cat([(ref_lp[j].exp() * (ref_lp[j] - lp[j])).sum(-1) for j in range(i, i + len(hops))])
        same.append(all(bool((lp[j].argmax(-1) == torch.tensor(flat[j][0][flat[j][1]:])).all())
                        for j in range(i, i + len(hops))))
        kls.append(float(k.mean()))
        i += len(hops)
    return kls, same


def coded(config, kv: torch.Tensor, chunk: int = 256) -> tuple[torch.Tensor, float]:
    """``kv`` through a codec chunk by chunk, and the codec's ratio vs fp16."""
    codec = KVCodec(config, FINGERPRINT)
    out, nbytes = torch.empty_like(kv), 0
    for i in range(0, kv.shape[2], chunk):
        blob = codec.encode(kv[:, :, i:i + chunk].contiguous())
        nbytes += len(blob)
        part = torch.empty_like(kv[:, :, i:i + chunk])
        codec.decode(blob, part)
        out[:, :, i:i + chunk] = part
    return out, kv.numel() * 2 / nbytes


def units(layers: int, heads: int, per_head: bool) -> list[tuple[int, int, int | None]]:
    """The (layer, K/V, head) units ``planes`` quantizes one at a time; head None = the whole plane."""
    return [(layer, i, h) for layer in range(layers) for i in range(2)
            for h in (range(heads) if per_head else [None])]


def one_plane_quantized(kv: torch.Tensor) -> torch.Tensor:
    """Every plane of ``kv`` quantized at the default steps (keys 0.5, values 1.0 x row RMS)."""
    layers, _, tokens, heads, head_dim = kv.shape
    layout = Layout(plan("rms", layers), tokens, heads * head_dim)
    scales = torch.empty(layout.num_scales, dtype=torch.float16)
    symbols = torch.empty(layout.symbols_nbytes, dtype=torch.int8)
    quant.quantize(kv.reshape(layers, 2, tokens, -1).float(), layout, scales, symbols)
    out = torch.empty_like(kv)
    quant.dequantize_into(layout, scales, symbols, out)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("command", choices=["planes", "codecs"])
    p.add_argument("--seed", type=int, default=9, help="task seed (bench quality scores seed 0: fit on others)")
    p.add_argument("--documents", type=int, default=12, help="documents, half needle and half chain (see --task)")
    p.add_argument("--task", choices=["both", "needle", "chain"], default="both",
                   help="only documents of one task (bench quality's loss is in needle retrieval: docs/results.md)")
    p.add_argument("--codecs", default="balanced,high", help="codecs: bench codec presets (with + modifiers), comma-separated")
    p.add_argument("--generate", action="store_true", help="codecs: also answer greedily and score accuracy")
    p.add_argument("--per-head", action="store_true", help="planes: quantize one KV head of a plane at a time")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_model("smollm2-135m", "float32")
    needle = {"both": args.documents // 2, "needle": args.documents, "chain": 0}[args.task]
    spec = TaskSpec(needle_documents=needle, chain_documents=args.documents - needle, seed=args.seed)
    builder = TaskBuilder(loaded.tokenizer, spec)
    _, model = _load("smollm2-135m")
    layers = model.config.num_hidden_layers
    names = args.codecs.split(",") if args.command == "codecs" else []
    heads = model.config.num_key_value_heads
    plane_kl = {u: 0.0 for u in units(layers, heads, args.per_head)}
    rows = {n: {"ratio": [], "kl": [], "identical": [], "correct": []} for n in names}
    recompute: list[bool] = []
    tasks: list[str] = []  # each question's task, for the per-task answer KL
    started = time.monotonic()
    for d, doc in enumerate(builder.documents()):
        kv = _prefill(model, torch.tensor([list(doc.prefix_ids)]))
        ref = Answers(model, builder, doc, kv)
        ref_lp = forced(model, kv, [h for hops in ref.hops for h in hops])
        recompute += ref.correct
        tasks += [q.task for q in doc.questions]
        if args.command == "planes":
            q = one_plane_quantized(kv)
            for layer, i, h in plane_kl:
                mixed = kv.clone()
                if h is None:
                    mixed[layer, i] = q[layer, i]
                else:
                    mixed[layer, i, :, h] = q[layer, i, :, h]
                plane_kl[layer, i, h] += sum(compare(model, mixed, ref, ref_lp)[0])
        for n in names:
            decoded, ratio = coded(resolve_preset(n), kv)
            kls, same = compare(model, decoded, ref, ref_lp)
            row = rows[n]
            row["ratio"].append(ratio)
            row["kl"] += kls
            row["identical"] += same
            if args.generate:
                row["correct"] += Answers(model, builder, doc, decoded).correct
        print(f"document {d + 1}/{spec.needle_documents + spec.chain_documents} "
              f"({time.monotonic() - started:.0f} s)", file=sys.stderr, flush=True)
    n_q = len(recompute)
    report: dict = {"seed": args.seed, "documents": args.documents, "task": args.task, "questions": n_q,
                    "recompute_accuracy": sum(recompute) / n_q}
    if args.command == "planes":
        per = [[[plane_kl[layer, i, h] / n_q for h in (range(heads) if args.per_head else [None])]
                for i in range(2)] for layer in range(layers)]
        report["answer_kl"] = per if args.per_head else [[u[0] for u in pair] for pair in per]
    for n, row in rows.items():
        summary = {"ratio_vs_fp16": sum(row["ratio"]) / len(row["ratio"]), "answer_kl": sum(row["kl"]) / n_q,
                   "identical_share": sum(row["identical"]) / n_q}
        if row["correct"]:
            summary["accuracy"] = sum(row["correct"]) / n_q
        for task in sorted(set(tasks)):
            picked = [k for k, t in zip(row["kl"], tasks) if t == task]
            summary[f"answer_kl_{task}"] = sum(picked) / len(picked)
        report.setdefault("codecs", {})[n] = summary
        print(f"{n:32s} " + "  ".join(f"{k} {v:.4f}" for k, v in summary.items()))
    print(f"recompute accuracy {report['recompute_accuracy']:.3f} over {n_q} questions")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
