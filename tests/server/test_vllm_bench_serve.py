"""A real external client: ``vllm bench serve`` (prefix_repetition dataset) against ``shadowserve serve``."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.server.conftest import scrape

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "vllm_bench_serve.py"
FINISHED = 'shadowserve_requests_total{state="finished"}'

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs the vllm extra")


@pytest.mark.timeout(300)
def test_vllm_bench_serve_completes_and_counts_what_the_server_counts(api_server, tmp_path):
    tok = tmp_path / "tokenizer"
    made = subprocess.run([sys.executable, "-m", "shadowserve.cli", "models", "tokenizer", "tiny-random", str(tok)],
                          capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr[-2000:]
    before = scrape(api_server.url).get(FINISHED, 0.0)
    num_prompts = 12
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--backend", "openai", "--base-url", api_server.url,
         "--endpoint", "/v1/completions", "--model", "tiny-random", "--tokenizer", str(tok),
         "--dataset-name", "prefix_repetition", "--num-prompts", str(num_prompts),
         "--prefix-repetition-prefix-len", "256", "--prefix-repetition-suffix-len", "64",
         "--prefix-repetition-num-prefixes", "3", "--prefix-repetition-output-len", "8",
         "--max-concurrency", "4", "--ignore-eos", "--temperature", "0", "--disable-tqdm",
         "--save-result", "--result-dir", str(tmp_path / "results"), "--result-filename", "result.json"],
        capture_output=True, text=True, timeout=280,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    result = json.loads((tmp_path / "results" / "result.json").read_text())
    served = scrape(api_server.url)[FINISHED] - before
    assert result["completed"] == num_prompts == served
    assert result["failed"] == 0
    # Its tokenizer is ours, exported: the output it counted is the output we generated.
    assert result["total_output_tokens"] == num_prompts * 8
