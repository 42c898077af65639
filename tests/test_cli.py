"""The ``shadowserve`` command as a user runs it: real subprocesses, exit codes, JSON output."""

from __future__ import annotations

import json
import subprocess
import sys


def cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shadowserve.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_generate_json():
    proc = cli("generate", "--model", "tiny-random", "--prompt", "hello", "--max-tokens", "4", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert set(out) >= {"text", "token_ids", "prompt_token_ids", "ttft_ms", "tpot_ms"}
    assert len(out["token_ids"]) == 4 and out["prompt_token_ids"] == [b + 3 for b in b"hello"]
    assert out["ttft_ms"] > 0 and out["tpot_ms"] > 0


def test_user_errors_exit_2_without_traceback():
    for args, message in [
        (("generate", "--model", "nope", "--prompt", "x"), "unknown model"),
        (("generate", "--model", "tiny-random", "--prompt", "x", "--dtype", "float8"), "unknown dtype"),
        (("generate", "--model", "tiny-random", "--prompt", "x", "--max-tokens", "0"), "max_tokens"),
        (("generate", "--model", "tiny-random", "--prompt", "x" * 5000), "context"),
        (("generate", "--model", "tiny-random", "--prompt", "x", "--linear-kernel", "int3"), "unknown linear_kernel"),
        (("generate", "--model", "tiny-random", "--prompt", "x", "--dtype", "bfloat16", "--linear-kernel", "fp16"),
         "float32 model on the CPU"),
        (("models", "pull", "nope"), "unknown model"),
    ]:
        proc = cli(*args)
        assert proc.returncode == 2, (args, proc.stderr)
        assert proc.stderr.startswith("error: ") and message in proc.stderr
        assert "Traceback" not in proc.stderr


def test_help_texts_show_defaults_and_no_markup():
    top = cli("--help")
    assert top.returncode == 0 and "``" not in top.stdout and "--log-level" in top.stdout
    demo = " ".join(cli("demo", "--help").stdout.split())  # argparse wraps lines
    for shown in ("(default: smollm2-135m)", "(default: 8)", "(default: 0)", "(default: balanced)"):
        assert shown in demo
    assert "(default: None)" not in " ".join(cli("serve", "--help").stdout.split())


def test_models_list():
    proc = cli("models", "list")
    assert proc.returncode == 0
    for name in ("smollm2-135m", "tiny-random", "llama3-8b-shape", "mistral-7b-shape"):
        assert name in proc.stdout


def test_demo_runs_end_to_end_on_tiny_random():
    """The main job's code path (store server, cold pass, every fetch mode) on a fast model."""
    proc = cli("demo", "--model", "tiny-random", "--documents", "1", "--questions", "2", "--doc-tokens", "600",
               "--max-tokens", "4", "--kv-quality", "lossless", timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {line.split("(")[0].strip(): line for line in proc.stdout.splitlines() if "%" in line}
    recompute = next(line for line in proc.stdout.splitlines() if line.startswith("recompute")).split()
    assert recompute[-5] == "-"  # nothing fetched, no fetch time
    for mode in ("sync", "thread", "offload"):
        fields = rows[mode].split()
        fetched, accuracy, same_answer = fields[-3:]
        assert fetched != "0%", rows[mode]  # something was fetched
        assert same_answer == "100%", rows[mode]  # lossless codec: same answers as recompute
        assert accuracy == recompute[-2], rows[mode]  # ... so the same accuracy against the gold answers
        ttft_ms, fetch_ms = float(fields[-6]), float(fields[-5])
        assert 0 < fetch_ms < ttft_ms, rows[mode]  # the fetch is a part of the TTFT
    assert "gold" in proc.stdout  # the example names its gold answer


def test_bench_engine_measures_each_kernel(tmp_path):
    out = tmp_path / "engine.json"
    proc = cli("bench", "engine", "--model", "tiny-random", "--no-hf", "--prefill-lengths", "64", "--batch-sizes",
               "2", "--decode-tokens", "4", "--repeats", "1", "--kernels", "dense,auto", "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["kernels"][0] == "dense" and set(result["kernels"]) <= {"dense", "fp16"}
    assert [r["phase"] for r in result["rows"]] == ["prefill", "decode"]
    for row in result["rows"]:
        assert set(row["ours_tok_s"]) == set(result["kernels"]) and all(v > 0 for v in row["ours_tok_s"].values())


def test_bench_linear_times_each_kernel(tmp_path):
    out = tmp_path / "linear.json"
    proc = cli("bench", "linear", "--batch-sizes", "2", "--kernels", "dense,fp16", "--repeats", "1", "--threads", "1",
               "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    (row,) = json.loads(out.read_text())["rows"]
    assert row["rows"] == 2 and row["dense"] > 0 and row["fp16"] > 0
