"""KV block allocation with reference counts and local prefix reuse.

Full blocks are named by a chained hash of their tokens (each hash covers the whole prefix up to
that block), so two requests sharing a prefix share its blocks. Freed blocks keep their contents
and stay findable by hash until they are reused, least recently freed first. The chain starts from
the request's ``cache_salt`` (0 without one), so requests with different salts never share blocks.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from hashlib import blake2b

import numpy as np
import xxhash

from shadowserve.engine.request import Request


def block_hash(prev: int, tokens: Sequence[int]) -> int:
    """Chained 64-bit hash of one full block: stable across processes (never Python's hash())."""
    return xxhash.xxh3_64_intdigest(np.asarray(tokens, dtype="<i4").tobytes(), seed=prev)


def salt_seed(cache_salt: str | None) -> int:
    """Where a request's hash chain starts: 0 unsalted (as before salts existed), else 64 bits of blake2b.

    A cryptographic hash here, unlike the blocks', because the salt is the secret that keeps tenants
    apart: one tenant must not be able to pick a salt that lands on another's chain.
    """
    if cache_salt is None:
        return 0
    digest = blake2b(cache_salt.encode("utf-8"), digest_size=8, person=b"ss-blocks").digest()
    return int.from_bytes(digest, "little")


class BlockManager:
    """Hands out block ids to requests; tracks which full blocks hold which prefix."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_count = [0] * num_blocks
        self.hash_of: list[int | None] = [None] * num_blocks
        self.block_of_hash: dict[int, int] = {}
        # Free blocks in reuse order: hash-less ones at the front, cached ones in LRU order after.
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def prefix_hashes(self, token_ids: Sequence[int], max_blocks: int,
                      cache_salt: str | None = None) -> list[int]:
        hashes, prev = [], salt_seed(cache_salt)
        bs = self.block_size
        for i in range(min(max_blocks, len(token_ids) // bs)):
            prev = block_hash(prev, token_ids[i * bs : (i + 1) * bs])
            hashes.append(prev)
        return hashes

    def match_prefix(self, token_ids: Sequence[int], cache_salt: str | None = None) -> list[int]:
        """Blocks already holding this token sequence's leading full blocks (at least one token is left to compute)."""
        if not self.enable_prefix_caching:
            return []
        blocks = []
        for h in self.prefix_hashes(token_ids, (len(token_ids) - 1) // self.block_size, cache_salt):
            b = self.block_of_hash.get(h)
            if b is None:
                break
            blocks.append(b)
        return blocks

    def can_allocate(self, request: Request, cached_blocks: Sequence[int]) -> bool:
        reusable_free = sum(1 for b in cached_blocks if self.ref_count[b] == 0)
        need = self.blocks_needed(request.num_tokens) - len(cached_blocks)
        return need <= self.num_free_blocks - reusable_free

    def allocate(self, request: Request, cached_blocks: Sequence[int]) -> None:
        """Give the request blocks for all its current tokens, reusing ``cached_blocks`` as its prefix."""
        for b in cached_blocks:
            self._take(b)
        request.block_ids = list(cached_blocks)
        request.block_hashes = [self.hash_of[b] for b in cached_blocks]
        while len(request.block_ids) < self.blocks_needed(request.num_tokens):
            request.block_ids.append(self._alloc_fresh())

    def ensure_slots(self, request: Request, num_tokens: int) -> bool:
        """Grow the request's block list to hold ``num_tokens`` tokens; False if memory is short."""
        need = self.blocks_needed(num_tokens) - len(request.block_ids)
        if need > self.num_free_blocks:
            return False
        for _ in range(need):
            request.block_ids.append(self._alloc_fresh())
        return True

    def register_computed(self, request: Request) -> None:
        """Name every newly full, computed block by its prefix hash so later requests can reuse it."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        full = min(request.num_computed_tokens, request.num_tokens) // bs
        if len(request.block_hashes) >= full:
            return
        tokens = request.all_token_ids
        prev = request.block_hashes[-1] if request.block_hashes else salt_seed(request.cache_salt)
        for i in range(len(request.block_hashes), full):
            prev = block_hash(prev, tokens[i * bs : (i + 1) * bs])
            request.block_hashes.append(prev)
            b = request.block_ids[i]
            if prev not in self.block_of_hash and self.hash_of[b] is None:
                self.hash_of[b] = prev
                self.block_of_hash[prev] = b

    def free_request(self, request: Request) -> None:
        """Drop the request's references; unreferenced blocks become reusable (cached ones last)."""
        self.release(reversed(request.block_ids))
        request.block_ids = []
        request.block_hashes = []

    def hold(self, block_ids: Sequence[int]) -> None:
        """Take an extra reference (e.g. while the data plane reads or may still write these blocks)."""
        for b in block_ids:
            self._take(b)

    def release(self, block_ids: Iterable[int]) -> None:
        """Drop one reference per block; a block nobody references becomes reusable."""
        for b in block_ids:
            self.ref_count[b] -= 1
            if self.ref_count[b] < 0:
                raise RuntimeError(f"block {b} released more often than taken")
            if self.ref_count[b] == 0:
                self.free[b] = None
                if self.hash_of[b] is None:
                    self.free.move_to_end(b, last=False)

    def replace_blocks(self, request: Request, first: int, last: int) -> bool:
        """Give the request fresh blocks at positions [first, last); the old ones keep their other holders."""
        if last - first > self.num_free_blocks:
            return False
        old = request.block_ids[first:last]
        request.block_ids[first:last] = [self._alloc_fresh() for _ in old]
        self.release(old)
        return True

    def _alloc_fresh(self) -> int:
        b, _ = self.free.popitem(last=False)
        h = self.hash_of[b]
        if h is not None:  # evict the cached prefix this block held
            self.hash_of[b] = None
            if self.block_of_hash.get(h) == b:
                del self.block_of_hash[h]
        self.ref_count[b] = 1
        return b

    def _take(self, b: int) -> int:
        if self.ref_count[b] == 0:
            self.free.pop(b, None)
        self.ref_count[b] += 1
        return b
