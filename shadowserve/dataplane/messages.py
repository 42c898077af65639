"""The small messages that cross between control plane and data plane (never bulk data)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class FetchCommand:
    """Land chunks ``keys[i]`` into KV blocks ``block_ids[i]`` (one list of blocks per chunk, in order)."""

    job_id: int
    request_id: str
    keys: tuple[bytes, ...]
    block_ids: tuple[tuple[int, ...], ...]


@dataclass(frozen=True)
class SaveCommand:
    """Encode the KV in ``block_ids[i]`` and put it in the store under ``keys[i]``."""

    job_id: int
    request_id: str
    keys: tuple[bytes, ...]
    block_ids: tuple[tuple[int, ...], ...]


@dataclass
class Completion:
    """Outcome of one job: how many leading chunks succeeded, and why the rest did not."""

    job_id: int
    request_id: str
    kind: str  # "fetch" or "save"
    num_chunks: int
    ok_chunks: int  # leading chunks that landed (fetch) or were stored (save)
    error: str | None = None
    error_kinds: dict[str, int] = field(default_factory=dict)  # failed chunks by kind (controlplane/store_health.py)
    nbytes: int = 0  # compressed bytes moved
    seconds: float = 0.0
    stage_seconds: dict[str, float] = field(default_factory=dict)  # this job's busy time per stage
    tier_chunks: int = 0  # chunks served by the local tier (no network)
    tier_bytes: int = 0
    store_bytes: int = 0  # bytes that crossed the link from the store
    store_seconds: float = 0.0  # wall span from the first store read's start to the last one's end
    tier_events: list[tuple[bytes, bool]] = field(default_factory=list)  # local-tier key changes (local_tier.py)

    @property
    def ok(self) -> bool:
        return self.ok_chunks == self.num_chunks
