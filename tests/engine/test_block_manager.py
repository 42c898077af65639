"""Block accounting: reference counts, prefix sharing, eviction order."""

from __future__ import annotations

from shadowserve.engine.block_manager import BlockManager, block_hash
from shadowserve.engine.request import Request, SamplingParams


def req(tokens: list[int], rid: str = "r") -> Request:
    return Request(rid, tokens, SamplingParams())


def test_hash_is_chained_and_stable():
    assert block_hash(0, [1, 2, 3]) == block_hash(0, [1, 2, 3])
    assert block_hash(0, [1, 2, 3]) != block_hash(1, [1, 2, 3])
    assert block_hash(0, [1, 2, 3]) != block_hash(0, [1, 2, 4])


def test_hash_stable_across_processes():
    import subprocess
    import sys

    code = "from shadowserve.engine.block_manager import block_hash; print(block_hash(7, [1, 2, 3, 70000]))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert int(out) == block_hash(7, [1, 2, 3, 70000])


def test_shared_prefix_blocks_are_reference_counted():
    bm = BlockManager(num_blocks=10, block_size=4)
    a = req(list(range(10)), "a")
    bm.allocate(a, [])
    a.num_computed_tokens = 10
    bm.register_computed(a)  # two full blocks named
    b = req(list(range(8)) + [99, 98, 97], "b")
    cached = bm.match_prefix(b.all_token_ids)
    assert cached == a.block_ids[:2]
    bm.allocate(b, cached)
    assert bm.ref_count[cached[0]] == 2
    bm.free_request(a)
    assert bm.ref_count[cached[0]] == 1
    bm.free_request(b)
    assert bm.num_free_blocks == 10
    # Freed but still cached: a third request finds the prefix again.
    assert bm.match_prefix(list(range(9))) == cached


def test_match_leaves_one_token_to_compute():
    bm = BlockManager(num_blocks=4, block_size=4)
    a = req(list(range(8)))
    bm.allocate(a, [])
    a.num_computed_tokens = 8
    bm.register_computed(a)
    bm.free_request(a)
    assert len(bm.match_prefix(list(range(8)))) == 1  # the last token must still run to get logits


def test_uncached_blocks_are_reused_before_cached_ones():
    bm = BlockManager(num_blocks=3, block_size=4)
    a = req(list(range(4)) + [50])
    bm.allocate(a, [])  # two blocks: one full (named below), one partial
    a.num_computed_tokens = 5
    bm.register_computed(a)
    named = a.block_ids[0]
    bm.free_request(a)
    c = req([7, 7])
    bm.allocate(c, [])
    assert c.block_ids[0] != named  # hash-less free blocks go first
    assert bm.match_prefix(list(range(4)) + [1]) == [named]
