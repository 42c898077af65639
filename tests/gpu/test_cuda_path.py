"""The CUDA path (issue #9): engine and KV pool on the GPU, every fetch mode writing into GPU memory.

All of these skip without CUDA. With a lossless codec, fetched KV must give exactly the tokens that
recompute gives; the pipeline-level tests check bytes in the device pool directly.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import torch

from shadowserve.config import CodecConfig, DataPlaneConfig, EngineConfig
from shadowserve.dataplane.messages import FetchCommand, SaveCommand
from shadowserve.dataplane.pipeline import Pipeline
from shadowserve.dataplane.spec import buffer_layout
from shadowserve.engine.engine import LLMEngine
from shadowserve.engine.request import RequestStatus, SamplingParams
from shadowserve.kvcache.codec import KVCodec
from shadowserve.llm import create_engine
from shadowserve.store.memory import MemoryStore
from tests.dataplane.test_end_to_end import prompts, run

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)")

LOSSLESS = CodecConfig(quant="none", lossless="zstd")
GREEDY = SamplingParams(max_tokens=8, ignore_eos=True)
CHUNK = 32
LAYERS, HEADS, DIM, BS = 3, 2, 8, 16


@pytest.fixture(scope="module")
def tiny_gpu():
    from shadowserve.model.loader import load_model

    return load_model("tiny-random", "float32", device="cuda", progress=False)


def engine(loaded, url: str | None, mode: str, codec: CodecConfig = LOSSLESS, **plane) -> LLMEngine:
    cfg = DataPlaneConfig(fetch_mode=mode, chunk_size=CHUNK, heartbeat_interval=0.2, heartbeat_timeout=5.0, **plane)
    return create_engine(EngineConfig(model="tiny-random", device="cuda", kv_cache_memory="16MiB"), loaded=loaded,
                         dataplane=cfg, store_url=url, codec=codec)


def reference(loaded, ps):
    eng = engine(loaded, None, "recompute")
    try:
        return [r.output_token_ids for r in run(eng, ps)]
    finally:
        eng.close()


def warm(loaded, url: str, ps, codec: CodecConfig = LOSSLESS) -> None:
    cold = engine(loaded, url, "thread", codec)
    run(cold, ps)
    cold.flush()
    assert cold.kv_manager.stats.saved_chunks >= len(ps[0]) // CHUNK
    cold.close()


def test_two_dimensional_copies_are_available():
    """The image under test has cuda-bindings; without it landing still works, plane by plane."""
    from shadowserve.dataplane.cuda_copy import load_copy_2d

    pytest.importorskip("cuda.bindings", reason="cuda-bindings is not installed")
    assert load_copy_2d() is not None


def test_engine_runs_on_the_gpu(tiny_gpu):
    eng = engine(tiny_gpu, None, "recompute")
    assert eng.kv_pool.tensor.is_cuda
    ps = prompts(4, seed=0)
    outs = run(eng, ps, SamplingParams(max_tokens=12, ignore_eos=True))
    assert all(len(r.output_token_ids) == 12 for r in outs)
    # Batched decoding gives what each prompt gives alone.
    alone = run(eng, ps[:1], SamplingParams(max_tokens=12, ignore_eos=True))
    assert alone[0].output_token_ids == outs[0].output_token_ids
    eng.close()


@pytest.mark.parametrize("mode", ["sync", "thread", "offload", "gpu"])
def test_fetched_prefix_into_gpu_memory_gives_identical_tokens(tiny_gpu, tmp_path, mode):
    url = f"file://{tmp_path}/store"
    ps = prompts(3, seed=1)
    warm(tiny_gpu, url, ps[:1])
    eng = engine(tiny_gpu, url, mode)
    reqs = run(eng, ps)
    assert [r.output_token_ids for r in reqs] == reference(tiny_gpu, ps)
    assert sorted(r.num_fetched_tokens for r in reqs) == [0, 0, 192], eng.kv_manager.stats
    eng.close()


@pytest.mark.parametrize("mode", ["offload", "gpu"])
def test_lossy_codec_lands_the_same_kv_as_the_host_decoder(tiny_gpu, tmp_path, mode):
    """A lossy codec: the fetched answer may differ from recompute, but the KV in the blocks must equal
    what the host-side decoder makes of the same stored chunks (same rounding, no stray writes)."""
    url = f"file://{tmp_path}/store"
    codec = CodecConfig(quant="rms", lossless="deflate")
    ps = prompts(1, seed=2, shared_prefix=256)
    warm(tiny_gpu, url, ps, codec)
    eng = engine(tiny_gpu, url, mode, codec)
    req = eng.add_request(ps[0], SamplingParams(max_tokens=4, ignore_eos=True))  # still running after its prefill
    while req.status in (RequestStatus.WAITING, RequestStatus.FETCHING):
        eng.step()
    assert req.num_fetched_tokens == 256
    blocks = req.block_ids[: 256 // BS]
    landed = eng.kv_pool.tensor[:, :, blocks].reshape(4, 2, 256, -1).cpu()
    from shadowserve.kvcache.chunking import chunk_keys, key_seed
    from shadowserve.store import open_store

    kc = KVCodec(codec, tiny_gpu.fingerprint)
    keys = chunk_keys(ps[0], CHUNK, key_seed(tiny_gpu.fingerprint, kc.kv_format_id))
    store = open_store(url)
    expect = torch.cat([kc.decode(store.get(k), torch.empty(landed.shape[0], 2, CHUNK, *eng.kv_pool.shape[-2:]))
                        .reshape(landed.shape[0], 2, CHUNK, -1) for k in keys[: 256 // CHUNK]], dim=2)
    assert torch.equal(landed, expect)
    run(eng, [])
    eng.close()


def test_kill_dataplane_mid_fetch_into_gpu(tiny_gpu, tmp_path):
    url = f"file://{tmp_path}/store"
    ps = prompts(1, seed=4, shared_prefix=900)
    warm(tiny_gpu, url, ps)
    eng = engine(tiny_gpu, url + "?bandwidth=5mbit", "offload")
    backend = eng.kv_manager.backend
    old_pid = backend.process.pid
    req = eng.add_request(ps[0], GREEDY)
    while req.status != RequestStatus.FETCHING:
        eng.step()
    time.sleep(0.2)
    os.kill(old_pid, signal.SIGKILL)
    while eng.has_unfinished():
        eng.step()
    assert req.output_token_ids == reference(tiny_gpu, ps)[0]
    assert eng.kv_manager.stats.dataplane_restarts == 1
    assert backend.healthy() and backend.process.pid != old_pid
    eng.close()


# ---- the pipeline over a device pool ----------------------------------------------------------


def _pipeline(mode: str, codec: CodecConfig, num_blocks: int = 40, dtype=torch.bfloat16):
    pool = torch.zeros(LAYERS, 2, num_blocks, BS, HEADS, DIM, dtype=dtype, device="cuda")
    kc = KVCodec(codec, "fp")
    cfg = DataPlaneConfig(fetch_mode=mode, chunk_size=CHUNK, receive_slots=2, staging_slots=2, kv_slots=2)
    layout = buffer_layout((LAYERS, 2, CHUNK, HEADS, DIM), pool.element_size(), kc)
    store = MemoryStore()
    return pool, kc, store, Pipeline(cfg, store, kc, pool, layout)


def _wait(pipeline, cmd):
    done, box = threading.Event(), []
    pipeline.submit(cmd, lambda c: (box.append(c), done.set()))
    assert done.wait(60)
    return box[0]


def _blocks_of(pool, blocks):
    return pool[:, :, list(blocks)].reshape(LAYERS, 2, len(blocks) * BS, HEADS, DIM).cpu()


@pytest.mark.parametrize("mode", ["thread", "gpu", "thread-per-plane"])
@pytest.mark.parametrize("quant", ["none", "rms", "kivi"])
def test_pipeline_lands_exact_kv_in_device_blocks(mode, quant):
    codec = CodecConfig(quant=quant, lossless="lz4")
    pool, kc, store, pipe = _pipeline(mode.removesuffix("-per-plane"), codec)
    if mode.endswith("per-plane"):
        pipe._target.copy_2d = None  # the fallback without cuda-bindings: one torch copy per plane
    chunks = [torch.randn(LAYERS, 2, CHUNK, HEADS, DIM).to(torch.bfloat16) for _ in range(3)]
    expect = []
    for i, kv in enumerate(chunks):
        blob = kc.encode(kv)
        store.put(b"k%d" % i, blob)
        expect.append(kc.decode(blob, torch.empty(LAYERS, 2, CHUNK, HEADS, DIM, dtype=torch.bfloat16)))
    dest = ((4, 5), (17, 9), (-1, 31))  # contiguous, scattered (reversed), first block already local
    done = _wait(pipe, FetchCommand(1, "r", (b"k0", b"k1", b"k2"), dest))
    assert done.ok and done.ok_chunks == 3
    assert torch.equal(_blocks_of(pool, dest[0]), expect[0])
    assert torch.equal(_blocks_of(pool, dest[1]), expect[1])
    assert torch.equal(_blocks_of(pool, [31]), expect[2][:, :, BS:])
    written = {4, 5, 17, 9, 31}
    untouched = [b for b in range(40) if b not in written]
    assert pool[:, :, untouched].abs().sum().item() == 0
    assert all(v == 0 for v in pipe.stats()["buffer_in_use"].values())
    pipe.close()


@pytest.mark.parametrize("per_plane", [False, True])
def test_save_from_device_blocks_round_trips(per_plane):
    pool, kc, store, pipe = _pipeline("thread", LOSSLESS)
    if per_plane:
        pipe._target.copy_2d = None
    pool.copy_(torch.randn(pool.shape).to(pool.dtype))
    done = _wait(pipe, SaveCommand(1, "r", (b"s0", b"s1"), ((2, 3), (11, 7))))
    assert done.ok and done.ok_chunks == 2
    out = torch.empty(LAYERS, 2, CHUNK, HEADS, DIM, dtype=pool.dtype)
    assert torch.equal(kc.decode(store.get(b"s0"), out), _blocks_of(pool, (2, 3)))
    assert torch.equal(kc.decode(store.get(b"s1"), out), _blocks_of(pool, (11, 7)))
    pipe.close()

