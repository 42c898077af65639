"""Fetch or recompute inside real vLLM (CPU): a slow link makes the connector compute, a fast one fetch.

Each case runs vLLM with the connector in a fresh interpreter (vLLM's KV connector is process-global),
against its own store server, the link emulated on the store URL (``?bandwidth=``). The run: misses of
six lengths (vLLM's prefill steps, timed by the scheduler side), a 1024-token document computed and
saved, one load of it (no link estimate yet: fetched), then three more requests on the document. At
10 Mbit/s the first load takes most of a second, and the three are computed; unshaped, they are loaded.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time

import pytest

pytest.importorskip("vllm", reason="the vLLM connector tests need the vllm extra: pip install -e '.[vllm]'")

pytestmark = pytest.mark.slow


def _drive(model_dir: str, bandwidth: str) -> dict:
    """Runs in the child: the sequence above; returns what each request got and the decisions."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    from shadowserve.store.launch import start_store_server

    srv = start_store_server()
    url = srv.url + (f"?bandwidth={bandwidth}" if bandwidth else "")
    kvt = KVTransferConfig(kv_connector="ShadowServeConnector", kv_connector_module_path="shadowserve.integrations.vllm",
                           kv_role="kv_both", kv_connector_extra_config={
                               "store_url": url, "quant": "none", "lossless": "zstd", "fetch_mode": "offload",
                               "chunk_size": 256, "fetch_policy": "auto"})
    llm = LLM(model_dir, enforce_eager=True, dtype="float32", kv_transfer_config=kvt, max_model_len=2048)
    sched = llm.llm_engine.engine_core.engine_core.scheduler.connector.scheduler
    worker = get_kv_transfer_group()
    rng = random.Random(1)
    greedy = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)

    seconds: list[float] = []

    def run(prompt: list[int]) -> int:
        t0 = time.perf_counter()
        cached = llm.generate([{"prompt_token_ids": prompt}], greedy, use_tqdm=False)[0].num_cached_tokens
        seconds.append(round(time.perf_counter() - t0, 3))
        return cached

    def settle() -> None:
        """Saves land, vLLM frees their blocks (one short step), then its own prefix cache is dropped."""
        deadline = time.monotonic() + 30
        while worker.worker.backend.saving:
            assert time.monotonic() < deadline
            worker.worker.collect()
            time.sleep(0.01)
        run([5, 6, 7])
        assert llm.reset_prefix_cache()

    for n in (300, 500, 700, 900, 1100, 1300):
        run([rng.randrange(3, 500) for _ in range(n)])
    doc = [rng.randrange(3, 500) for _ in range(1024)]
    run(doc + [7])
    settle()
    cached, times = [run(doc + [8])], [seconds[-1]]
    for i in range(3):
        settle()
        cached.append(run(doc + [9 + i]))
        times.append(seconds[-1])
    out = {"cached": cached, "seconds": times, "fetched_tokens": worker.stats()["fetched_tokens"],
           "decisions": {f"{a}/{b}": n for (a, b), n in sched.manager.policy.counts.items()},
           "link_bytes_per_second": sched.manager.policy.estimates()["link_bytes_per_second"]}
    worker.shutdown()
    llm.llm_engine.engine_core.shutdown()
    srv.stop()
    return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from shadowserve.integrations.vllm.random_model import save_random_llama

    return str(save_random_llama(tmp_path_factory.mktemp("vllm-policy-model"), hidden_size=128, num_heads=2,
                                 num_kv_heads=1))


@pytest.mark.parametrize("bandwidth, fetched", [("10mbit", False), ("", True)], ids=["10mbit", "unshaped"])
def test_decision_flips_with_the_link_inside_vllm(model_dir, bandwidth, fetched):
    proc = subprocess.run([sys.executable, __file__, model_dir, bandwidth], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["cached"][0] == 1024  # the first load: no link estimate yet, so the hit is fetched
    assert got["decisions"].get("fetch/optimistic") == 1
    if fetched:
        assert got["cached"][1:] == [1024] * 3 and got["decisions"].get("fetch/measured") == 3
        assert got["fetched_tokens"] == 4 * 1024
    else:
        assert got["cached"][1:] == [0] * 3 and got["decisions"].get("recompute/measured") == 3
        assert got["fetched_tokens"] == 1024
        assert got["link_bytes_per_second"] == pytest.approx(10e6 / 8, rel=0.3)  # measured by the worker


if __name__ == "__main__":  # python tests/integrations/test_vllm_fetch_policy.py MODEL_DIR 10mbit|""
    if not os.path.isdir(sys.argv[1]):
        from shadowserve.integrations.vllm.random_model import save_random_llama

        save_random_llama(sys.argv[1], hidden_size=128, num_heads=2, num_kv_heads=1)
    print(json.dumps(_drive(sys.argv[1], sys.argv[2])), flush=True)
