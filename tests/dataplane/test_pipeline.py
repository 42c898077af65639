"""The pipeline on its own: chunks land in exactly their blocks, by either write path; saves round-trip."""

from __future__ import annotations

import threading

import pytest
import torch

from shadowserve.config import CodecConfig, DataPlaneConfig
from shadowserve.dataplane.messages import FetchCommand, SaveCommand
from shadowserve.dataplane.pipeline import Pipeline
from shadowserve.dataplane.spec import buffer_layout
from shadowserve.kvcache.codec import KVCodec
from shadowserve.store.memory import MemoryStore

LAYERS, HEADS, DIM, BS, CHUNK = 3, 2, 8, 16, 32


def setup(num_blocks: int = 40, config: CodecConfig | None = None):
    pool = torch.zeros(LAYERS, 2, num_blocks, BS, HEADS, DIM)
    codec = KVCodec(config or CodecConfig(quant="none", lossless="lz4"), "fp")
    cfg = DataPlaneConfig(fetch_mode="thread", chunk_size=CHUNK, receive_slots=2, staging_slots=2, kv_slots=1)
    layout = buffer_layout((LAYERS, 2, CHUNK, HEADS, DIM), 4, codec)
    store = MemoryStore()
    return pool, codec, store, Pipeline(cfg, store, codec, pool, layout)


def wait(pipeline, cmd):
    done, box = threading.Event(), []
    pipeline.submit(cmd, lambda c: (box.append(c), done.set()))
    assert done.wait(30)
    return box[0]


def blocks_of(pool, blocks):
    """A chunk's KV [layers, 2, tokens, heads, dim] read back from the given blocks."""
    return pool[:, :, blocks].reshape(LAYERS, 2, len(blocks) * BS, HEADS, DIM)


def test_fetch_lands_in_contiguous_and_scattered_blocks():
    pool, codec, store, pipe = setup()
    chunks = [torch.randn(LAYERS, 2, CHUNK, HEADS, DIM) for _ in range(3)]
    for i, kv in enumerate(chunks):
        store.put(b"k%d" % i, codec.encode(kv))
    dest = ((4, 5), (17, 9), (30, 31))  # contiguous, scattered (reversed), contiguous
    done = wait(pipe, FetchCommand(1, "r", (b"k0", b"k1", b"k2"), dest))
    assert done.ok and done.ok_chunks == 3 and done.nbytes > 0
    for kv, blocks in zip(chunks, dest):
        assert torch.equal(blocks_of(pool, list(blocks)), kv)
    untouched = [b for b in range(40) if b not in {b for d in dest for b in d}]
    assert pool[:, :, untouched].abs().sum() == 0
    stats = pipe.stats()
    assert all(v == 0 for v in stats["buffer_in_use"].values())
    pipe.close()


def test_blocked_chunks_save_and_fetch_like_any_other():
    """Chunks with 4 KiB lossless blocks (container version 3) and one-stream ones (version 2) mix."""
    blocked = CodecConfig(quant="none", lossless="zstd", lossless_block=4096, min_saving=0)
    pool, codec, store, pipe = setup(config=blocked)
    pool.normal_()
    assert wait(pipe, SaveCommand(1, "r", (b"s0",), ((7, 3),))).ok
    assert codec.read_header(store.get(b"s0")).blocked
    plain = KVCodec(CodecConfig(quant="none", lossless="zstd", min_saving=0), "fp")
    kv = torch.randn(LAYERS, 2, CHUNK, HEADS, DIM)
    store.put(b"p0", plain.encode(kv))
    expect = blocks_of(pool, [7, 3]).clone()
    done = wait(pipe, FetchCommand(2, "r", (b"s0", b"p0"), ((20, 21), (30, 31))))
    assert done.ok and done.ok_chunks == 2
    assert torch.equal(blocks_of(pool, [20, 21]), expect) and torch.equal(blocks_of(pool, [30, 31]), kv)
    pipe.close()


def test_only_the_leading_good_chunks_count():
    pool, codec, store, pipe = setup()
    store.put(b"k0", codec.encode(torch.randn(LAYERS, 2, CHUNK, HEADS, DIM)))
    store.put(b"k1", b"\x00" * 100)  # garbage: fails the container check
    store.put(b"k2", codec.encode(torch.randn(LAYERS, 2, CHUNK, HEADS, DIM)))
    done = wait(pipe, FetchCommand(2, "r", (b"k0", b"k1", b"k2"), ((0, 1), (2, 3), (4, 5))))
    assert done.ok_chunks == 1 and not done.ok and "decompress" in done.error
    done = wait(pipe, FetchCommand(3, "r", (b"k0", b"missing"), ((0, 1), (2, 3))))
    assert done.ok_chunks == 1 and "not in the store" in done.error
    assert all(v == 0 for v in pipe.stats()["buffer_in_use"].values())
    pipe.close()


def test_save_then_fetch_round_trip():
    pool, codec, store, pipe = setup()
    pool.normal_()
    src = ((7, 3), (11, 12))
    done = wait(pipe, SaveCommand(4, "r", (b"s0", b"s1"), src))
    assert done.ok
    out = torch.empty(LAYERS, 2, CHUNK, HEADS, DIM)
    for key, blocks in zip((b"s0", b"s1"), src):
        codec.decode(store.get(key), out)
        assert torch.equal(out, blocks_of(pool, list(blocks)))
    pipe.close()


def test_gpu_mode_needs_a_device_pool():
    from shadowserve.errors import ConfigError

    pool = torch.zeros(LAYERS, 2, 8, BS, HEADS, DIM)
    codec = KVCodec(CodecConfig(quant="none", lossless="lz4"), "fp")
    cfg = DataPlaneConfig(fetch_mode="gpu", chunk_size=CHUNK)
    with pytest.raises(ConfigError, match="GPU memory"):
        Pipeline(cfg, MemoryStore(), codec, pool, buffer_layout((LAYERS, 2, CHUNK, HEADS, DIM), 4, codec))
