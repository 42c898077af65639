"""``shadowserve bench vllm`` on real vLLM (CPU): the connector's configuration really loads the prefix."""

from __future__ import annotations

import json

import pytest

from shadowserve.cli import main

pytest.importorskip("vllm", reason="the vLLM benchmark needs the vllm extra: pip install -e '.[vllm]'")

pytestmark = pytest.mark.slow


def test_bench_vllm_loads_the_cached_prefix(tmp_path) -> None:
    out = tmp_path / "vllm.json"
    rc = main(["bench", "vllm", "--prefix", "512", "--rounds", "1", "--layers", "2", "--hidden", "256",
               "--configs", "shadowserve lossless", "--json", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())["results"]["shadowserve lossless"]
    assert result["cached_tokens"] == [512]  # the whole document came from the store, not vLLM's compute
    assert result["fetch"][0]["fetched_tokens"] >= 512
    assert all(t > 0 for t in result["cold_ttft_s"] + result["cached_ttft_s"])


def test_bench_vllm_refuses_a_prefix_shorter_than_a_chunk(capsys) -> None:
    assert main(["bench", "vllm", "--prefix", "100"]) == 2
    assert "shorter than one stored chunk" in capsys.readouterr().err
