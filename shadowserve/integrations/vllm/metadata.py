"""What the two halves of the connector tell each other each step: small, picklable specs.

Scheduler to worker (``ShadowServeMetadata``): loads, saves, preemptions. Token ids and the request's
cache salt travel (the worker derives chunk keys from them with the same key function); KV never does:
the data plane reads and writes vLLM's blocks directly.

Worker to scheduler (``ShadowServeWorkerMeta``): which steps ran, and the data plane's completions, so
the scheduler side's tier directory and fetch-or-recompute estimates learn from the worker's fetches.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata, KVConnectorWorkerMetadata

from shadowserve.dataplane.messages import Completion


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
    step: int = -1  # the scheduler side's number for this step (echoed back in ShadowServeWorkerMeta)


@dataclass
class ShadowServeWorkerMeta(KVConnectorWorkerMetadata):
    """The worker's answer after a step: the step numbers it ran, the completions its data plane
    reported since the last answer, how many times its data plane has restarted (a restart
    empties the local tier, so the scheduler side's mirror of it must empty too), and whether a
    restarted one is still starting (loads asked for meanwhile would only be refused)."""

    steps: list[int] = field(default_factory=list)
    completions: list[Completion] = field(default_factory=list)
    restarts: int = 0
    starting: bool = False

    def aggregate(self, other: KVConnectorWorkerMetadata) -> ShadowServeWorkerMeta:
        if not isinstance(other, ShadowServeWorkerMeta):
            return self
        return ShadowServeWorkerMeta(self.steps + other.steps, self.completions + other.completions,
                                     max(self.restarts, other.restarts), self.starting or other.starting)
