"""Block accounting: reference counts, prefix sharing, eviction order."""

from __future__ import annotations

from shadowserve.engine.block_manager import BlockManager, block_hash, salt_seed
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


def test_unsalted_chain_is_the_one_before_salts():
    # Pinned (computed before salts existed): local prefix reuse across the change keeps working.
    assert BlockManager(8, 4).prefix_hashes(list(range(12)), 3) == [
        11660027832386793900, 2615516339191896381, 11813949576292976408]
    assert salt_seed(None) == 0


def test_salted_requests_share_blocks_only_within_their_salt():
    bm = BlockManager(num_blocks=16, block_size=4)
    tokens = list(range(13))  # three full blocks and one token to compute

    def computed(rid: str, salt: str | None) -> Request:
        r = Request(rid, list(tokens), SamplingParams(cache_salt=salt))
        bm.allocate(r, bm.match_prefix(r.all_token_ids, r.cache_salt))
        r.num_computed_tokens = r.num_tokens
        bm.register_computed(r)
        bm.free_request(r)
        return r

    computed("a", "alice")
    assert bm.match_prefix(tokens, "bob") == [] and bm.match_prefix(tokens) == []
    assert len(bm.match_prefix(tokens, "alice")) == 3
    computed("plain", None)
    assert len(bm.match_prefix(tokens)) == 3
    # Same tokens, three key spaces: three separate sets of cached blocks.
    assert set(bm.match_prefix(tokens)).isdisjoint(bm.match_prefix(tokens, "alice"))
    assert bm.prefix_hashes(tokens, 3, "alice") != bm.prefix_hashes(tokens, 3, "bob")
