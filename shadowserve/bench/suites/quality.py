"""``shadowserve bench quality``: task accuracy with gold answers, per quality level and codec.

Lossy KV is judged the way a user judges it: on questions with known answers over long documents
(bench/common/quality_tasks.py), each codec answering the same questions as recompute with the document's
KV fetched through the data plane (bench/common/quality_runner.py). Per codec it reports accuracy with a 95%
Wilson interval, the paired difference from recompute with a 95% document-cluster bootstrap interval
and McNemar's exact test (bench/common/quality_stats.py), the share of answers token-identical to
recompute, and the ``bench codec`` figures of the same codec on long text: ratio vs fp16, KL,
perplexity change, teacher-forced top-1 agreement and decode GB/s per core.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from tqdm import tqdm

from shadowserve.bench.common.quality_runner import QualityRunner
from shadowserve.bench.common.quality_stats import accuracy_interval, paired_summary, per_task_summaries
from shadowserve.bench.common.quality_tasks import TASKS, TaskBuilder, TaskSpec
from shadowserve.bench.suites.codec import CodecBench, resolve_preset
from shadowserve.config import CodecConfig
from shadowserve.errors import ConfigError
from shadowserve.kvcache.levels import DEFAULT_QUALITY, QUALITY_LEVELS
from shadowserve.model.loader import load_model
from shadowserve.store.launch import start_store_server

DEFAULT_CODECS = "default,cachegen-zstd,int8-zstd"
CODEC_FIGURES_MODEL = "smollm2-135m"
QUICK = {"needle_documents": 2, "chain_documents": 2, "chunks_per_document": 2, "needles": 3, "chains": 2}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m", help="model to answer with (a name or path)")
    p.add_argument("--quick", action="store_true",
                   help="a few-minute smoke run: 4 short documents, levels only, short codec figures")
    spec = TaskSpec()
    p.add_argument("--needle-documents", type=int, default=spec.needle_documents,
                   help=f"documents with {spec.needles} hidden codes each (default {spec.needle_documents})")
    p.add_argument("--chain-documents", type=int, default=spec.chain_documents,
                   help=f"documents with {spec.chains} guard->code chains each (default {spec.chain_documents})")
    p.add_argument("--chunks-per-document", type=int, default=spec.chunks_per_document,
                   help=f"document length in chunks of 256 tokens (default {spec.chunks_per_document})")
    p.add_argument("--needles", type=int, default=spec.needles, help=f"codes per needle document (default {spec.needles})")
    p.add_argument("--chains", type=int, default=spec.chains, help=f"chains per chain document (default {spec.chains})")
    p.add_argument("--seed", type=int, default=spec.seed, help="task generation seed (fix it before comparing)")
    p.add_argument("--codecs", default=DEFAULT_CODECS,
                   help=f"bench codec presets to try beside the four levels, comma-separated (default {DEFAULT_CODECS}; "
                        "'' for none)")
    p.add_argument("--levels", default=",".join(QUALITY_LEVELS),
                   help="quality levels to run, comma-separated (default: all four)")
    p.add_argument("--fetch-mode", default="offload", choices=["offload", "thread", "sync"],
                   help=f"how the {DEFAULT_QUALITY} level fetches from its store server (the others use sync, "
                        "which lands the same KV in-process)")
    p.add_argument("--group", type=int, default=4, help="documents answered together (one batch of questions)")
    p.add_argument("--context", type=int, default=2048, help="codec figures: tokens of long text coded")
    p.add_argument("--eval-tokens", type=int, default=256, help="codec figures: tokens scored after it")
    p.add_argument("--repeat", type=int, default=3, help="codec figures: decode timing passes (best reported)")
    p.add_argument("--plot", metavar="FILE", help="rate-distortion plot (PNG): ratio vs accuracy change and vs KL")


def run(args: argparse.Namespace) -> int:
    sizes = dict(QUICK) if args.quick else {
        "needle_documents": args.needle_documents, "chain_documents": args.chain_documents,
        "chunks_per_document": args.chunks_per_document, "needles": args.needles, "chains": args.chains}
    spec = TaskSpec(seed=args.seed, **sizes)
    if spec.questions < 1 or spec.chunks_per_document < 1:
        raise ConfigError("bench quality needs at least one document of at least one chunk")
    if not 1 <= spec.needles <= 16 or not 1 <= spec.chains <= 16:
        raise ConfigError("--needles and --chains must be in 1..16 (one colour per fact)")
    levels = {n: QUALITY_LEVELS[n] for n in _names(args.levels, QUALITY_LEVELS, "quality level")}
    extra = _extra_codecs("" if args.quick else args.codecs, levels)
    configs: dict[str, CodecConfig] = {**levels, **extra}

    started = time.monotonic()
    loaded = load_model(args.model, "float32")
    builder = TaskBuilder(loaded.tokenizer, spec)
    documents = builder.documents()
    server = start_store_server("--capacity", "2GiB") if args.fetch_mode != "sync" else None
    print(f"model {args.model}: {spec.questions} questions over {len(documents)} documents of "
          f"{spec.chunks_per_document * spec.chunk_size} tokens (seed {spec.seed}); {DEFAULT_QUALITY} fetches "
          f"by {args.fetch_mode}{' from a store server' if server else ''}, the others by sync", flush=True)
    try:
        runner = QualityRunner(loaded, builder, configs, DEFAULT_QUALITY, server.url if server else None,
                               args.fetch_mode, args.group)
        try:
            with tqdm(total=len(documents), desc="documents", unit="doc") as bar:
                runner.run(documents, bar.update)
        finally:
            runner.close()
    finally:
        if server is not None:
            server.stop()
    answer_seconds = time.monotonic() - started

    # The codec figures come from bench codec's reference path (HF transformers on the SmolLM2 GGUF),
    # whatever model answered: the report names it.
    bench = CodecBench(CODEC_FIGURES_MODEL, 256 * 2 if args.quick else args.context,
                       64 if args.quick else args.eval_tokens, model_threads=2)
    figures = {n: bench.measure(n, c, 1 if args.quick else args.repeat) for n, c in configs.items()}
    questions = [q for d in documents for q in d.questions]
    report = build_report(questions, runner, figures, extra)
    report.update({"model": args.model, "codec_figures_model": CODEC_FIGURES_MODEL, "seed": spec.seed,
                   "spec": spec.__dict__, "fetch_mode": args.fetch_mode, "answer_seconds": answer_seconds})
    print_report(report)
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(report, f, indent=2)
    if args.plot:
        plot(report, args.plot)
    return 0


def _names(text: str, known, what: str) -> list[str]:
    chosen = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in chosen if n not in known]
    if unknown:
        raise ConfigError(f"unknown {what}(s) {', '.join(unknown)}: choose from {', '.join(known)}")
    return chosen


def _extra_codecs(names: str, levels: dict[str, CodecConfig]) -> dict[str, CodecConfig]:
    # A preset equal to a level that runs is measured once, under the level's name.
    chosen = [n.strip() for n in names.split(",") if n.strip()]
    configs = {n: resolve_preset(n) for n in chosen}  # a preset, "+" modifiers and all
    return {n: c for n, c in configs.items() if n not in levels and c not in levels.values()}


def build_report(questions, runner, figures: dict[str, dict[str, Any]],
                 extra: dict[str, CodecConfig]) -> dict[str, Any]:
    """The JSON the suite writes: recompute's accuracy, then every level's and codec's comparison."""
    ref = runner.recompute
    clusters = [q.document for q in questions]
    acc, low, high = accuracy_interval(ref.correct)
    report: dict[str, Any] = {
        "questions": len(questions),
        "documents": len(set(clusters)),
        "recompute": {"accuracy": acc, "accuracy_ci": [low, high], "per_task": _per_task(questions, ref.correct),
                      "chain_first_hop_accuracy": _first_hop(ref)},
        "levels": {},
        "codecs": {},
        # Per question, so runs can be pooled question by question (scripts/pool_quality.py): its
        # document, its task's initial, and "1"/"0" for right/wrong, one character per question.
        "per_question": {"document": clusters, "task": "".join(q.task[0] for q in questions),
                         "recompute": _marks(ref.correct)},
    }
    for name, contestant in runner.contestants.items():
        ans = contestant.answers
        if ans.fetched_tokens != ans.document_tokens:
            raise ConfigError(f"{name}: fetched {ans.fetched_tokens} of {ans.document_tokens} document tokens; "
                              "a failed fetch would have recomputed and hidden the codec's effect")
        acc, low, high = accuracy_interval(ans.correct)
        fig = figures[name]
        row = {
            "codec": contestant.codec.codec_id,
            "accuracy": acc,
            "accuracy_ci": [low, high],
            **paired_summary(ref.correct, ans.correct, clusters),  # delta_points, delta_ci, lost, gained, mcnemar_p
            "identical_share": sum(a == b for a, b in zip(ans.tokens, ref.tokens)) / len(ref.tokens),
            "per_task": _per_task(questions, ans.correct),
            "per_task_delta": per_task_summaries([q.task for q in questions], ref.correct, ans.correct, clusters),
            "chain_first_hop_accuracy": _first_hop(ans),
            "fetch_mode": contestant.fetch_mode,
            "ratio_vs_fp16": fig["ratio_vs_fp16"],
            "kl": fig["kl"],
            "ppl_increase_pct": fig["ppl_increase_pct"],
            "argmax_agreement": fig["argmax_agreement"],
            "decode_gbps_per_core": fig["decode_gbps_per_core"],
        }
        report["codecs" if name in extra else "levels"][name] = row
        report["per_question"][name] = _marks(ans.correct)
    return report


def _marks(correct: list[bool]) -> str:
    return "".join("1" if c else "0" for c in correct)


def _per_task(questions, correct: list[bool]) -> dict[str, float]:
    out = {}
    for task in TASKS:
        picked = [c for q, c in zip(questions, correct) if q.task == task]
        if picked:
            out[task] = sum(picked) / len(picked)
    return out


def _first_hop(answers) -> float | None:
    hops = [h for h in answers.first_hop_correct if h is not None]
    return sum(hops) / len(hops) if hops else None


def print_report(report: dict[str, Any]) -> None:
    r = report["recompute"]
    tasks = ", ".join(f"{t} {a:.1%}" for t, a in r["per_task"].items())
    print(f"\n{report['questions']} questions over {report['documents']} documents; recompute accuracy "
          f"{r['accuracy']:.1%} [{r['accuracy_ci'][0]:.1%}, {r['accuracy_ci'][1]:.1%}] ({tasks})")
    header = (f"{'codec':<16} {'accuracy [95% CI]':<22} {'Δ pts [95% CI]':<22} {'McNemar p':>9} {'same':>6} "
              f"{'ratio':>6} {'KL':>7} {'ppl+%':>6} {'top1':>6} {'dec GB/s':>8}")
    print(header)
    print("-" * len(header))
    for group in ("levels", "codecs"):
        for name, row in report[group].items():
            acc = f"{row['accuracy']:.1%} [{row['accuracy_ci'][0]:.1%}, {row['accuracy_ci'][1]:.1%}]"
            delta = f"{row['delta_points']:+.1f} [{row['delta_ci'][0]:+.1f}, {row['delta_ci'][1]:+.1f}]"
            print(f"{name:<16} {acc:<22} {delta:<22} {row['mcnemar_p']:>9.3f} {row['identical_share']:>6.0%} "
                  f"{row['ratio_vs_fp16']:>6.2f} {row['kl']:>7.4f} {row['ppl_increase_pct']:>6.2f} "
                  f"{row['argmax_agreement']:>6.3f} {row['decode_gbps_per_core']:>8.2f}")
            print(" " * 17 + ", ".join(f"{task} {d['delta_points']:+.1f} [{d['delta_ci'][0]:+.1f}, {d['delta_ci'][1]:+.1f}] "
                                       f"{d['lost']}/{d['gained']} lost/gained"
                                       for task, d in row["per_task_delta"].items()))
    print("Δ pts: accuracy minus recompute's on the same questions (cluster bootstrap over documents); McNemar p: "
          "exact test of the questions exactly one of the two got right; same: answers token for token "
          "recompute's; ratio/KL/ppl/top1/dec: bench codec's figures for the same codec on long text")


def plot(report: dict[str, Any], path: str) -> None:
    """Ratio vs fp16 against accuracy change (with its interval) and against KL, a point per codec."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ConfigError("--plot needs matplotlib (pip install shadowserve[bench])") from exc
    rows = {**report["levels"], **report["codecs"]}
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, row in rows.items():
        colour = "tab:blue" if name in report["levels"] else "tab:gray"
        lo, hi = row["delta_ci"]
        left.errorbar(row["ratio_vs_fp16"], row["delta_points"], yerr=[[row["delta_points"] - lo],
                      [hi - row["delta_points"]]], fmt="o", color=colour, capsize=3)
        left.annotate(name, (row["ratio_vs_fp16"], row["delta_points"]), textcoords="offset points",
                      xytext=(4, 4), fontsize=8)
        right.scatter(row["ratio_vs_fp16"], max(row["kl"], 1e-6), color=colour)
        right.annotate(name, (row["ratio_vs_fp16"], max(row["kl"], 1e-6)), textcoords="offset points",
                       xytext=(4, 4), fontsize=8)
    left.axhline(0, color="black", lw=0.8)
    left.axhline(-2, color="tab:red", lw=0.8, ls="--")
    left.set(xlabel="compression ratio vs fp16", ylabel="accuracy change vs recompute (points, 95% CI)",
             title=f"task accuracy ({report['questions']} questions)")
    right.set(xlabel="compression ratio vs fp16", ylabel="KL(exact || decoded), nats/token", yscale="log",
              title="next-token distortion on long text")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
