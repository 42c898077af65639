"""``shadowserve bench paper``: the ShadowServe paper's figures, measured on this system in one run.

One grid of load runs (long-doc QA, Poisson arrivals, the store warmed with the documents) over
fetch modes x link bandwidths x request rates feeds three figures: mean TTFT vs bandwidth at a light
rate, loaded TPOT vs request rate at a reference bandwidth, and throughput (the highest rate at which
``--target`` of requests meet the SLOs) vs bandwidth. ``bench stages`` adds the stage chart. Every
figure is a PNG plus the JSON it was drawn from; ``summary.json`` holds the ratios the report quotes.
Modes take turns at every (rate, link) point, so their numbers are side by side in one run.
``--passes N`` runs the grid N times: on a noisy machine one pass of a few requests per point
cannot rank modes, and the spread of each ratio over the passes says how far to trust it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

from tqdm import tqdm

from shadowserve.bench.common import plots
from shadowserve.bench.common.drivers import drive
from shadowserve.bench.common.engine_driver import EngineDriver
from shadowserve.bench.common.harness import Harness, doc_prompt, store_url, write_json
from shadowserve.bench.common.machine import machine_info
from shadowserve.bench.common.metrics import (
    compute_metrics,
    max_rate_meeting_slo,
    parse_goodput,
    request_latencies,
)
from shadowserve.bench.common.workloads import add_workload_arguments, build_workload, with_arrivals
from shadowserve.bench.suites import stages
from shadowserve.cores import pin_to_dataplane_cores
from shadowserve.kvcache.levels import DEFAULT_QUALITY, QUALITY_LEVELS
from shadowserve.model.loader import load_model
from shadowserve.store.launch import start_store_server

# name: (quick, full). Flags given on the command line win over both.
PRESETS = {
    "num_documents": (3, 4),
    "questions_per_doc": (2, 4),
    "doc_tokens": ((1024, 2048), (1024, 3072)),
    "output_len": ((8, 24), (8, 32)),
    "ttft_bandwidths": ("1,10,40", "1,2,5,10,20,40"),
    "load_bandwidths": ("1,10", "1,10,40"),
    "rates": ("1,2,4", "0.5,1,1.5,2"),
    "ref_bandwidth": (10.0, 10.0),
    "stage_tokens": (2048, 4096),
    # Calibrated on the 2-core machine with the fp16 weight kernel (session 4): at 1 req/s a fetched
    # document's TTFT is ~0.5 s and TPOT ~65 ms; at 2 req/s ~10 requests decode over 1-3K-token
    # contexts and a step takes 200-400 ms (float32 KV reads are memory-bound), so the SLOs bind
    # between 1 and 2 req/s.
    "goodput": (["ttft:2000", "tpot:200"], ["ttft:2000", "tpot:200"]),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="directory for the PNGs and JSON files")
    p.add_argument("--quick", action="store_true", help="a small grid that finishes in minutes")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--modes", default="recompute,sync,thread,offload")
    p.add_argument("--baseline-cores", default="both", choices=("both", "reserved", "engine"),
                   help="where sync and thread run their pipelines: both placements side by side (thread and "
                        "thread@engine), only the reserved data-plane cores, or only the engine's own cores")
    add_workload_arguments(p)
    for name in ("num_documents", "questions_per_doc", "doc_tokens", "output_len"):
        p.set_defaults(**{name: None})
    p.add_argument("--ttft-bandwidths", default=None, help="Gbit/s for the TTFT figure")
    p.add_argument("--load-bandwidths", default=None, help="Gbit/s for the throughput figure")
    p.add_argument("--rates", default=None, help="request rates (req/s)")
    p.add_argument("--ref-bandwidth", type=float, default=None, help="Gbit/s of the TPOT-vs-rate figure")
    p.add_argument("--goodput", nargs="+", default=None, metavar="METRIC:MS", help="SLOs, e.g. ttft:4000 tpot:600")
    p.add_argument("--target", type=float, default=0.9, help="SLO attainment that counts as meeting the SLOs")
    p.add_argument("--stage-tokens", type=int, default=None, help="stored tokens for the stage chart")
    p.add_argument("--no-stages", action="store_true")
    p.add_argument("--passes", type=int, default=1,
                   help="run the whole grid this many times (mode order reversed on every other pass); "
                        "figures use each point's median, the summary keeps every pass's ratios")
    p.add_argument("--kv-cache-memory", default="3GiB")


def _apply_presets(args: argparse.Namespace) -> None:
    for name, (quick, full) in PRESETS.items():
        if getattr(args, name, None) is None:
            setattr(args, name, quick if args.quick else full)


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def plan_runs(modes: list[str], ttft_bws: list[float], load_bws: list[float], rates: list[float],
              ref_bw: float) -> dict[tuple[str, float | None], list[float]]:
    """(mode, bandwidth) -> the rates to run there. ``recompute`` ignores the link: bandwidth None."""
    want: dict[tuple[str, float | None], set[float]] = {}
    for mode in modes:
        points = {(b, rates[0]) for b in ttft_bws} | {(ref_bw, r) for r in rates} | {(b, r) for b in load_bws
                                                                                      for r in rates}
        for b, r in points:
            want.setdefault((mode, None if mode == "recompute" else b), set()).add(r)
    return {k: sorted(v) for k, v in sorted(want.items(), key=lambda kv: (kv[0][1] or 0, modes.index(kv[0][0])))}


def interleaved(plan: dict[tuple[str, float | None], list[float]], modes: list[str]
                ) -> list[tuple[str, float | None, float]]:
    """The plan's (mode, link, rate) runs ordered by rate, then link, then mode: modes take turns."""
    tasks = [(mode, bw, rate) for (mode, bw), rates in plan.items() for rate in rates]
    return sorted(tasks, key=lambda t: (t[2], t[1] or 0.0, modes.index(t[0])))


def passes_of(plan: dict[tuple[str, float | None], list[float]], modes: list[str], passes: int
              ) -> list[list[tuple[str, float | None, float]]]:
    """The interleaved grid once per pass; every other pass reverses the modes' order at each point,
    so going first or last at a point (a drifting machine favours one) lands on every mode alike."""
    return [interleaved(plan, modes if i % 2 == 0 else modes[::-1]) for i in range(max(1, passes))]


def median_runs(runs: dict[tuple, list[dict]]) -> dict[tuple, dict]:
    """One metrics dict per point: the median of every numeric metric over that point's passes.

    Non-numeric fields (per-request lists...) come from the pass whose mean TPOT is the median one.
    """
    merged: dict[tuple, dict] = {}
    for key, ms in runs.items():
        by_tpot = sorted(ms, key=lambda m: m.get("mean_tpot_ms") or 0.0)
        out = dict(by_tpot[(len(by_tpot) - 1) // 2])
        for name in ms[0]:
            values = [m.get(name) for m in ms]
            if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                out[name] = statistics.median(values)
        out.pop("pass", None)
        out["passes"] = len(ms)
        merged[key] = out
    return merged


def _lookup(runs: dict, mode: str, bw: float, rate: float) -> dict | None:
    return runs.get((mode, None if mode == "recompute" else bw, rate))


def build_figures(runs: dict, modes: list[str], ttft_bws, load_bws, rates, ref_bw, slos_ms, target) -> dict:
    """The three load figures' data from the grid's metrics."""
    def pick(m: dict, keys) -> dict:
        return {k: m.get(k) for k in keys}

    ttft = {"request_rate": rates[0], "modes": {}}
    tpot = {"bandwidth_gbps": ref_bw, "modes": {}}
    thr = {"slos_ms": slos_ms, "target_attainment": target, "rates": rates, "modes": {}}
    for mode in modes:
        ttft["modes"][mode] = [
            {"bandwidth_gbps": b, **pick(m, ("mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms"))}
            for b in ttft_bws if (m := _lookup(runs, mode, b, rates[0]))]
        tpot["modes"][mode] = [
            {"request_rate": r, **pick(m, ("mean_tpot_ms", "median_tpot_ms", "p99_tpot_ms", "mean_ttft_ms",
                                          "request_throughput", "slo_attainment"))}
            for r in rates if (m := _lookup(runs, mode, ref_bw, r))]
        pts = []
        for b in load_bws:
            att = {r: m["slo_attainment"] for r in rates if (m := _lookup(runs, mode, b, r))}
            pts.append({"bandwidth_gbps": b, "max_rate_meeting_slo": max_rate_meeting_slo(list(att), list(att.values()),
                                                                                          target),
                        "attainment_by_rate": att})
        thr["modes"][mode] = pts
    return {"ttft_vs_bandwidth": ttft, "tpot_vs_rate": tpot, "throughput_vs_bandwidth": thr}


def _ratio(a, b):
    return a / b if a and b else None


# The paper's headline figures against CacheGen-Async (arXiv 2509.16857), for the side-by-side table.
PAPER = {"tpot": 2.2, "ttft": 1.38, "throughput": 1.35}
PLACEMENT_MEANING = {
    "reserved": "baselines on the reserved data-plane cores: what the process boundary buys",
    "engine": "baselines on the engine's own cores: the paper's comparison (CacheGen-Async placement)",
}


def expand_modes(modes: list[str], placement: str) -> list[str]:
    """The modes to run: ``both`` puts each of sync and thread on both placements (``thread@engine``)."""
    out: list[str] = []
    for mode in modes:
        if mode in ("sync", "thread") and placement != "reserved":
            out += [mode, f"{mode}@engine"] if placement == "both" else [f"{mode}@engine"]
        else:
            out.append(mode)
    return out


def summarize(figs: dict, target: float, paper_low_bw: float = 20.0) -> dict:
    """Our ratios in the paper's terms: each baseline (``thread``, ``sync``, on either placement:
    ``thread@engine``) against ``offload`` (ShadowServe). Keys name the baseline, ``@`` as ``_``."""
    out: dict = {}
    tp = {m: {p["request_rate"]: p for p in pts} for m, pts in figs["tpot_vs_rate"]["modes"].items()}
    tt = {m: {p["bandwidth_gbps"]: p["mean_ttft_ms"] for p in pts} for m, pts in figs["ttft_vs_bandwidth"]["modes"].items()}
    th = {m: {p["bandwidth_gbps"]: p["max_rate_meeting_slo"] for p in pts}
          for m, pts in figs["throughput_vs_bandwidth"]["modes"].items()}
    baselines = [m for m in tp if m not in ("offload", "recompute")]
    for base in baselines:
        key = base.replace("@", "_")
        if "offload" not in tp:
            break
        both = sorted(set(tp[base]) & set(tp["offload"]))
        by_rate = {r: _ratio(tp[base][r]["mean_tpot_ms"], tp["offload"][r]["mean_tpot_ms"]) for r in both}
        out[f"tpot_{key}_over_offload_by_rate"] = by_rate
        sustained = [r for r in both if min(tp[base][r]["slo_attainment"], tp["offload"][r]["slo_attainment"]) >= target]
        r = max(sustained) if sustained else (both[0] if both else None)
        out[f"tpot_{key}_compare_rate"] = r
        out[f"tpot_{key}_compare_rate_sustained"] = bool(sustained)
        out[f"tpot_{key}_over_offload"] = by_rate.get(r)
        if base in tt and "offload" in tt:
            out[f"ttft_{key}_over_offload_by_bw"] = {b: _ratio(tt[base][b], tt["offload"].get(b)) for b in tt[base]}
    for other in [*baselines, "recompute"]:
        if other in th and "offload" in th:
            out[f"throughput_offload_over_{other.replace('@', '_')}_by_bw"] = {
                b: _ratio(th["offload"][b], th[other].get(b)) for b in th["offload"]}
    out["low_bandwidth_limit_gbps"] = paper_low_bw
    return out


def paper_table(ratios: dict) -> list[dict]:
    """One row per (placement, baseline): our loaded TPOT, low-bandwidth TTFT and throughput ratios
    beside the paper's, and what the row answers."""
    rows = []
    low = ratios.get("low_bandwidth_limit_gbps", 20.0)
    for placement, suffix in (("reserved", ""), ("engine", "_engine")):
        for base in ("thread", "sync"):
            key = base + suffix
            if f"tpot_{key}_over_offload" not in ratios:
                continue
            ttft = {b: v for b, v in ratios.get(f"ttft_{key}_over_offload_by_bw", {}).items() if v and b <= low}
            thr = {b: v for b, v in ratios.get(f"throughput_offload_over_{key}_by_bw", {}).items() if v}
            rows.append({
                "placement": placement, "baseline": base, "answers": PLACEMENT_MEANING[placement],
                "tpot_baseline_over_offload": ratios[f"tpot_{key}_over_offload"], "paper_tpot": PAPER["tpot"],
                "ttft_baseline_over_offload_low_bw": min(ttft.values()) if ttft else None,
                "ttft_low_bw_range": [min(ttft.values()), max(ttft.values())] if ttft else None,
                "paper_ttft": PAPER["ttft"],
                "throughput_offload_over_baseline": max(thr.values()) if thr else None,
                "paper_throughput": PAPER["throughput"],
            })
    return rows


def print_paper_table(rows: list[dict]) -> None:
    def f(v) -> str:
        return "   -  " if v is None else f"{v:5.2f}x"

    print("\nbaseline / offload, side by side with the paper (vs CacheGen-Async):")
    print(f"{'placement':<9} {'baseline':<8} {'TPOT':>7} {'paper':>6} {'TTFT<=20G':>10} {'paper':>6} "
          f"{'thruput':>8} {'paper':>6}")
    for r in rows:
        print(f"{r['placement']:<9} {r['baseline']:<8} {f(r['tpot_baseline_over_offload']):>7} {r['paper_tpot']:>5}x "
              f"{f(r['ttft_baseline_over_offload_low_bw']):>10} {r['paper_ttft']:>5}x "
              f"{f(r['throughput_offload_over_baseline']):>8} {r['paper_throughput']:>5}x")
    for placement, meaning in PLACEMENT_MEANING.items():
        if any(r["placement"] == placement for r in rows):
            print(f"  {placement}: {meaning}")


def run(args: argparse.Namespace) -> int:
    _apply_presets(args)
    args.workload = "long-doc-qa"
    started = time.time()
    os.makedirs(args.out, exist_ok=True)
    modes = expand_modes(args.modes.split(","), args.baseline_cores)
    ttft_bws, load_bws = _floats(args.ttft_bandwidths), _floats(args.load_bandwidths)
    rates, ref_bw = sorted(_floats(args.rates)), args.ref_bandwidth
    slos = parse_goodput(args.goodput)
    slos_ms = {k: v * 1e3 for k, v in slos.items()}
    machine_before = machine_info()
    loaded = load_model(args.model, "float32", progress=False)
    workload = build_workload(args, loaded.tokenizer, loaded.arch.max_position_embeddings)
    plan = plan_runs(modes, ttft_bws, load_bws, rates, ref_bw)
    server = start_store_server("--capacity", "8GiB")
    pin_to_dataplane_cores(server.pid)
    h = Harness(loaded, server.url, QUALITY_LEVELS[DEFAULT_QUALITY], kv_cache_memory=args.kv_cache_memory)
    runs: dict[tuple[str, float | None, float], list[dict]] = {}  # one metrics dict per pass
    figures: dict[str, dict] = {}
    grid = passes_of(plan, modes, args.passes)
    try:
        print(f"warming the store with {len(workload.warm_prompts)} documents "
              f"({sum(map(len, workload.warm_prompts))} tokens)", flush=True)
        h.warm(workload.warm_prompts)
        # Modes take turns at every (rate, link) point instead of running one after another, so a
        # slow drift of this shared machine lands on every mode alike (one engine per point).
        dead: set[tuple[str, float | None]] = set()  # (mode, link) past a rate where no request met the SLOs
        tasks = [(i, *task) for i, one_pass in enumerate(grid) for task in one_pass]
        with tqdm(total=len(tasks), desc="load grid", unit="run", file=sys.stdout) as bar:
            for pass_index, mode, bw, rate in tasks:
                bar.update()
                if (mode, bw) in dead:
                    continue
                bar.set_postfix_str(f"{mode} {'-' if bw is None else f'{bw:g}G'} {rate:g}/s")
                eng = h.engine(mode, store_url=store_url(server.url, bw))
                try:
                    specs = with_arrivals(workload.specs, rate, args.seed)
                    records = drive(EngineDriver(eng, timeout=600), specs, None)
                finally:
                    eng.close()
                m = compute_metrics(records, (50, 99), slos)
                # Per-request latencies too, so other SLOs can be applied to this run later.
                m["requests"] = [{k: None if v is None else v * 1e3 for k, v in request_latencies(r).items()}
                                 | {"ok": r.ok, "fetched_tokens": r.fetched_tokens} for r in records]
                m["pass"] = pass_index
                runs.setdefault((mode, bw, rate), []).append(m)
                tqdm.write(f"  {mode:<9} {'-' if bw is None else f'{bw:g}':>5} Gbit/s {rate:>5g} req/s: "
                           f"TTFT {m['mean_ttft_ms']:8.0f} ms  TPOT {m['mean_tpot_ms']:6.0f} ms  "
                           f"attain {m['slo_attainment']:.2f}", file=sys.stdout)
                # Past a rate where no request met the SLOs, higher rates only do worse: skip them,
                # except on the reference link, whose TPOT curve is a figure of its own.
                if m["slo_attainment"] == 0 and (bw != ref_bw or mode == "recompute"):
                    dead.add((mode, bw))
        figures = build_figures(median_runs(runs), modes, ttft_bws, load_bws, rates, ref_bw, slos_ms, args.target)
        by_pass = [build_figures({k: ms[i] for k, ms in runs.items() if len(ms) > i}, modes, ttft_bws, load_bws,
                                 rates, ref_bw, slos_ms, args.target) for i in range(len(grid))]
        if not args.no_stages:
            print("stage analysis ...", flush=True)
            prompt = doc_prompt(loaded.tokenizer, args.stage_tokens, offset=0)
            h.warm([prompt])
            figures["stages"] = stages.measure(h, prompt, repeats=3)
            stages.print_report(figures["stages"])
    finally:
        server.stop()
    summary = {
        "command": "shadowserve bench " + " ".join(sys.argv[sys.argv.index("paper"):]) if "paper" in sys.argv else None,
        "model": args.model, "quick": args.quick, "modes": modes, "workload": {
            "name": workload.name, "requests": len(workload.specs), "num_documents": args.num_documents,
            "questions_per_doc": args.questions_per_doc, "doc_tokens": args.doc_tokens, "output_len": args.output_len,
            "seed": args.seed},
        "slos_ms": slos_ms, "target_attainment": args.target,
        "machine_before": machine_before, "machine_after": machine_info(),
        "elapsed_s": time.time() - started,
        "passes": len(grid),
        "ratios": summarize(figures, args.target),
    }
    summary["paper_table"] = paper_table(summary["ratios"])
    if len(grid) > 1:
        summary["ratios_by_pass"] = [summarize(f, args.target) for f in by_pass]
    for name, fig in figures.items():
        write_json(os.path.join(args.out, f"{name}.json"), fig)
    write_json(os.path.join(args.out, "runs.json"), {
        "runs": [{"mode": m, "bandwidth_gbps": b, "request_rate": r, **met} for (m, b, r), ms in runs.items()
                 for met in ms]})
    write_json(os.path.join(args.out, "summary.json"), summary)
    if args.json_path:
        write_json(args.json_path, summary)
    written = plots.draw_all(figures, args.out)
    print(json.dumps(summary["ratios"], indent=1))
    print_paper_table(summary["paper_table"])
    print(f"wrote {len(written)} figures and their JSON to {args.out} in {summary['elapsed_s']:.0f} s")
    return 0
