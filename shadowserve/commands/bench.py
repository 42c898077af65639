"""``shadowserve bench SUITE``: every benchmark suite behind one command.

Each suite is a module ``shadowserve.bench.suites.<suite>`` with ``add_arguments(parser)`` and
``run(args) -> int``; it prints a table and, with ``--json FILE``, writes the numbers it printed.
"""

from __future__ import annotations

import argparse
import importlib

from shadowserve.cli import DefaultsHelpFormatter

SUITES: dict[str, str] = {
    "engine": "prefill and decode throughput of the engine vs HF transformers",
    "linear": "one decode step's weight matmuls per kernel (dense, fbgemm fp16, int4, int8) at several batch sizes",
    "codec": "KV codec size, accuracy and speed on real SmolLM2 KV",
    "quality": "task accuracy with gold answers per quality level and codec, paired against recompute",
    "store": "store GET throughput vs Redis vs raw sockets; shaped links",
    "interference": "decode TPOT of a running batch while other requests fetch, per fetch mode",
    "ttft": "TTFT of a cached long prefix vs link bandwidth, per fetch mode, unloaded and loaded",
    "load": "serving load test (vllm bench serve's metrics) per fetch mode over long-doc QA, chat or prefix reuse",
    "stages": "each data-plane stage's throughput alone and inside the pipeline; busy time and buffer occupancy",
    "gpu_copy": "CUDA: the data plane's landing path (pinned slots -> GPU KV blocks) vs raw host-to-device copies",
    "http": "HTTP server throughput vs the same engine in-process (the server's overhead)",
    "vllm": "vLLM with ShadowServeConnector vs vLLM alone: TTFT of a cached long prefix (needs the vllm extra)",
    "tiers": "the local compressed tier (TTFT, hit ratio, tokens/GiB under Zipf reuse) and fetch-or-recompute vs link",
    "soak": "a live server under concurrent load while faults fire (data plane killed, store restarted, "
            "chunks damaged, store full): every answer checked, leaks counted",
    "paper": "the paper's figures on this system: TTFT vs bandwidth, TPOT vs rate, throughput vs bandwidth, stages",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="suite", metavar="SUITE", required=True)
    for name, help_text in SUITES.items():
        try:
            module = importlib.import_module(f"shadowserve.bench.suites.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"shadowserve.bench.suites.{name}":
                raise
            continue
        p = sub.add_parser(name, help=help_text, description=help_text, formatter_class=DefaultsHelpFormatter)
        module.add_arguments(p)
        p.add_argument("--json", dest="json_path", metavar="FILE", help="write the printed numbers as JSON")
        p.set_defaults(_suite_run=module.run)


def run(args: argparse.Namespace) -> int:
    return int(args._suite_run(args) or 0)
