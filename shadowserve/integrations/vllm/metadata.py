"""What the scheduler-side connector tells the worker-side one each step: small, picklable specs.

Token ids and the request's cache salt travel (the worker derives chunk keys from them with the same
key function); KV never does: the data plane reads and writes vLLM's blocks directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata


@dataclass(frozen=True)
class LoadSpec:
    """Land the store's chunks for tokens [local_tokens, hit_tokens) into ``block_ids``.

    Blocks before ``local_tokens`` are vLLM's own prefix-cache hits: never written.
    """

    request_id: str
    prompt_token_ids: tuple[int, ...]
    block_ids: tuple[int, ...]
    local_tokens: int
    hit_tokens: int
    cache_salt: str | None = None  # the request's key space (vLLM's Request.cache_salt)


@dataclass(frozen=True)
class SaveSpec:
    """The prompt is computed: store its full chunks past ``stored_tokens`` from ``block_ids``."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    block_ids: tuple[int, ...]
    stored_tokens: int
    cache_salt: str | None = None


@dataclass
class ShadowServeMetadata(KVConnectorMetadata):
    loads: list[LoadSpec] = field(default_factory=list)
    saves: list[SaveSpec] = field(default_factory=list)
    preempted: frozenset[str] = frozenset()
    idle: bool = False  # no tokens scheduled this step: the worker may pause briefly while loads land
