"""What the KV cache manager needs from its surroundings, declared: whoever owns the KV blocks (our
BlockManager, the vLLM connector's ledger) and the function that names a prompt's chunks. The manager
calls these; the owner of the blocks and the builder implement them.
"""

from __future__ import annotations

from typing import Protocol

from shadowserve.engine.remote_kv import KVRequest


class BlockHolder(Protocol):
    """What the manager needs from whoever owns the KV blocks (our BlockManager, the vLLM ledger)."""

    block_size: int

    def hold(self, block_ids: list[int]) -> None:
        """Take an extra reference: the data plane reads (save) or may still write (late fetch) them."""

    def release(self, block_ids: list[int]) -> None:
        """Drop a reference taken with ``hold``."""

    def replace_blocks(self, request: KVRequest, first: int, last: int) -> bool:
        """Give the request fresh blocks at positions [first, last); False if that cannot be done now."""


class KeyFn(Protocol):
    def __call__(self, token_ids: list[int], cache_salt: str | None = None) -> list[bytes]:
        """The chained keys of the full chunks of a prompt, in the key space of its salt (None: shared)."""
