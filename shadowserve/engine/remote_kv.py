"""The engine's port to a remote KV cache: what the scheduler needs from one, and nothing of how.

The scheduler is the only code that moves requests between states (WAITING -> FETCHING -> RUNNING
-> FINISHED) and writes their token counts. A remote KV cache (the control plane's KVCacheManager,
or the vLLM connector's use of it) answers lookups, runs fetches and saves, and reports each fetch's
end as a ``FetchEnded`` value that the scheduler applies. ``NoRemoteKV`` stands in for ``recompute``
so the scheduler never checks for a missing cache.

Every method runs in the engine's process, on the thread that runs the scheduler, and must never
block on the store or the data plane (except where ``synchronous`` says the fetch itself is inline).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

from shadowserve.engine.block_manager import BlockManager
from shadowserve.engine.kv_pool import KVPool
from shadowserve.model.arch import ModelArch


class Pending(enum.Enum):
    """A lookup whose answer is not in yet (or whose chunks another request is fetching right now)."""

    PENDING = "pending"


PENDING = Pending.PENDING


def pairs_of(tokens: int, context: int) -> int:
    """Query-key pairs attended by ``tokens`` new tokens after ``context`` cached ones (causal attention):
    the measure of attention work that ``record_step`` reports beside the token count."""
    return tokens * context + tokens * (tokens + 1) // 2


class StepWork(NamedTuple):
    """What one engine step computes, in ``record_step``'s terms."""

    prefill_tokens: int
    other_tokens: int
    pairs: int
    kv_tokens: int


def step_work(parts: Iterable[tuple[int, int, int]]) -> StepWork:
    """The work of a step scheduling, per request, (tokens, tokens already computed, prompt length):
    read before the step advances the requests. Our engine and vLLM's scheduler side both time it."""
    prefill = total = pairs = kv_tokens = 0
    for tokens, done, prompt in parts:
        prefill += max(0, min(tokens, prompt - done))
        total += tokens
        pairs += pairs_of(tokens, done)
        kv_tokens += done + tokens
    return StepWork(prefill, total - prefill, pairs, kv_tokens)


class PromptRequest(Protocol):
    """What a lookup reads of a request (vLLM's own Request has these too); nothing is ever written.

    A ``cache_salt`` attribute (str), where a request has one, puts its chunk keys in that salt's own
    key space; a request without the attribute, or with None, uses the shared one.
    """

    request_id: str
    prompt_token_ids: Sequence[int]


class KVRequest(PromptRequest, Protocol):
    """What fetches and saves read of a request: also its KV blocks. Nothing is ever written."""

    block_ids: list[int]  # the request's KV blocks, in token order (destinations of fetches, sources of saves)


@dataclass(frozen=True)
class FetchEnded:
    """A fetch is over (landed, partly landed, failed, timed out or lost to a data-plane restart).

    ``computed_tokens``: prompt tokens whose KV is now in the request's blocks (local prefix plus the
    chunks that landed); the request prefills from there. ``fetched_tokens``: tokens that came from the
    store, or None when the data plane never reported the job (timeout, restart): then the request's
    count stays as it was and its blocks hold nothing new to register for local prefix reuse.
    """

    request: KVRequest
    computed_tokens: int
    fetched_tokens: int | None


class RemoteKV(Protocol):
    """What the engine needs from a remote KV cache (runs in the engine's process, scheduler thread)."""

    @property
    def chunk_size(self) -> int:
        """Tokens per stored chunk: fetches land whole chunks."""

    @property
    def synchronous(self) -> bool:
        """True when ``start_fetch`` returns only after the fetch ran (poll at once to collect it)."""

    @property
    def busy(self) -> bool:
        """True while any fetch or save is still out on the data plane."""

    def lookup(self, request: PromptRequest) -> int | Pending:
        """Prompt tokens (whole chunks) the cache holds for this request's prefix, or PENDING.

        Never blocks: the first call starts the lookup, later calls read its answer.
        """

    def start_fetch(self, request: KVRequest, local_tokens: int, hit_tokens: int) -> bool:
        """Fetch tokens [local_tokens, hit_tokens) into the request's blocks; True if a fetch started.

        ``local_tokens`` (already in the request's blocks) is a multiple of ``chunk_size``. The blocks
        must stay the request's until the fetch ends (a ``FetchEnded`` from ``poll``).
        """

    def poll(self) -> list[FetchEnded]:
        """Fetches that ended since the last call, for the scheduler to apply; also checks liveness."""

    def save(self, request: KVRequest, stored_tokens: int) -> None:
        """The prompt is computed: store its full chunks past ``stored_tokens`` (off the critical path)."""

    def abort(self, request: KVRequest) -> None:
        """The request goes away mid-fetch: keep its blocks away from reuse until the data plane lets go.

        Called before the scheduler frees the request's blocks; ``forget`` follows.
        """

    def record_step(self, prefill_tokens: int, other_tokens: int, seconds: float, pairs: int = 0,
                    kv_tokens: int = 0) -> None:
        """A model step that prefilled ``prefill_tokens`` (and ran ``other_tokens`` more) took ``seconds``;
        its tokens attended over ``pairs`` query-key pairs (``pairs_of``) and it read ``kv_tokens`` of cached
        KV (0: not known): the measured prefill cost against which fetching a prefix is weighed."""

    def decision(self, request: PromptRequest) -> dict | None:
        """Why the answered lookup fetches what it does (fetch, partial, recompute, and the estimates)."""

    def forget(self, request: PromptRequest) -> None:
        """The request finished: drop everything kept about it (keys, lookup, save marks)."""

    def close(self) -> None:
        """Stop the data plane and lookups; the engine's KV pool may be freed after this returns."""


class NoRemoteKV:
    """The port for ``recompute``: nothing is held remotely, so every prefix is computed."""

    chunk_size = 1  # never consulted: lookups always answer 0
    synchronous = False
    busy = False

    def lookup(self, request: PromptRequest) -> int | Pending:
        return 0

    def start_fetch(self, request: KVRequest, local_tokens: int, hit_tokens: int) -> bool:
        return False

    def poll(self) -> list[FetchEnded]:
        return []

    def save(self, request: KVRequest, stored_tokens: int) -> None:
        pass

    def abort(self, request: KVRequest) -> None:
        pass

    def record_step(self, prefill_tokens: int, other_tokens: int, seconds: float, pairs: int = 0,
                    kv_tokens: int = 0) -> None:
        pass

    def decision(self, request: PromptRequest) -> dict | None:
        return None

    def forget(self, request: PromptRequest) -> None:
        pass

    def close(self) -> None:
        pass


@dataclass(frozen=True)
class KVHost:
    """What an engine offers a remote KV cache to wire itself to: its KV memory, blocks, model and cores."""

    kv_pool: KVPool
    block_manager: BlockManager
    arch: ModelArch
    fingerprint: str  # names the KV the model computes (seeds the chunk keys)
    block_size: int
    dataplane_cores: tuple[int, ...]
    engine_cores: tuple[int, ...] = ()  # the model's own cores (a baseline's pipeline may share them)


# Builds the remote KV cache once the engine has its pool (the control plane's builder, wired in llm.py).
RemoteKVFactory = Callable[[KVHost], RemoteKV]
