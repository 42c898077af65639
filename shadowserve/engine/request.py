"""Requests and their sampling parameters: the unit the scheduler moves between states."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from shadowserve.errors import ConfigError


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop (vLLM-like names)."""

    max_tokens: int = 16
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means no top-k cut
    seed: int | None = None
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] = ()
    # Separates prefix caches (local blocks and stored chunks): only requests with the same salt share
    # a prefix. None shares with every unsalted request. vLLM's name and limits.
    cache_salt: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ConfigError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0, got {self.top_k}")
        check_cache_salt(self.cache_salt)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


MAX_CACHE_SALT_CHARS = 128  # vLLM's limit, so a client that works against one works against the other


def check_cache_salt(salt: object) -> None:
    """Refuse a salt that is not None or a non-empty string of at most MAX_CACHE_SALT_CHARS characters.

    The empty string is refused rather than read as "no salt": a client that meant to isolate itself
    but sent an empty value should hear about it, not silently share its prefixes.
    """
    if salt is None:
        return
    if not isinstance(salt, str) or not salt or len(salt) > MAX_CACHE_SALT_CHARS:
        shown = f"a string of {len(salt)} characters" if isinstance(salt, str) else type(salt).__name__
        raise ConfigError(f"cache_salt must be a non-empty string of at most {MAX_CACHE_SALT_CHARS} "
                          f"characters, got {shown}")


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # queued; not yet holding KV blocks
    FETCHING = "fetching"  # holds blocks; its cached prefix is being written into them by the data plane
    RUNNING = "running"  # prefilling its uncached part or decoding
    FINISHED = "finished"


@dataclass
class Request:
    """One generation request and everything the engine tracks about it."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    prompt: str | None = None
    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # chained hashes of its full, computed blocks
    num_computed_tokens: int = 0  # tokens whose KV is in the pool (cached, fetched or computed)
    num_cached_tokens: int = 0  # prompt tokens served from local prefix blocks (no compute)
    num_fetched_tokens: int = 0  # prompt tokens whose KV came from the remote store
    remote_hit_tokens: int = 0  # prompt tokens the store said it holds at lookup
    finish_reason: str | None = None
    arrival_time: float = field(default_factory=time.perf_counter)
    first_token_time: float | None = None
    finish_time: float | None = None
    token_times: list[float] = field(default_factory=list)
    # FETCHING time, so TTFT splits into lookup/queue, fetch and prefill. The clock is perf_counter;
    # the end is when the control plane saw the job end (polling delay included). A request that
    # fetches again after a preemption adds to fetch_seconds; the times are its latest fetch's.
    fetch_start_time: float | None = None
    fetch_end_time: float | None = None
    fetch_seconds: float | None = None  # None: it never fetched
    kv_decision: dict | None = None  # the control plane's fetch-or-recompute decision (RemoteKV.decision)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def cache_salt(self) -> str | None:
        """The prefix-cache key space this request lives in (None: the shared one)."""
        return self.sampling.cache_salt

    @property
    def is_finished(self) -> bool:
        return self.status == RequestStatus.FINISHED

    @property
    def ttft(self) -> float | None:
        """Seconds from arrival to the first output token."""
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def tpot(self) -> float | None:
        """Mean seconds per output token after the first."""
        if len(self.token_times) < 2:
            return None
        return (self.token_times[-1] - self.token_times[0]) / (len(self.token_times) - 1)


@dataclass
class RequestOutput:
    """What a caller gets back for a finished (or streaming) request."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finished: bool
    finish_reason: str | None
    ttft_ms: float | None
    tpot_ms: float | None
    num_cached_tokens: int = 0
    num_fetched_tokens: int = 0
    fetch_ms: float | None = None  # time its prefix spent being fetched (None: no fetch)
    kv_decision: dict | None = None  # fetch | partial | recompute, why, and the predicted TTFTs behind it
