"""The connector inside vLLM's worker: starts loads and saves on our data plane, reports their ends.

The KVCacheManager (the same class our scheduler drives) issues FetchCommands and SaveCommands for
vLLM's block ids and turns completions into "this request's load ended with N good tokens"; this
side translates that into vLLM's words: finished receives, failed block ids (vLLM recomputes them),
and finished sends (vLLM may free a finished request's blocks once its save has read them).
Nothing here waits on the data plane during a forward pass, except that a preempted request's
blocks are not given back while a save still reads them.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, deque
from dataclasses import dataclass

from shadowserve.controlplane.manager import KVCacheManager
from shadowserve.controlplane.ports import BlockHolder
from shadowserve.dataplane.backends import FetchBackend
from shadowserve.dataplane.messages import Completion, FetchCommand, SaveCommand
from shadowserve.engine.remote_kv import FetchEnded, KVRequest
from shadowserve.integrations.vllm.metadata import LoadSpec, SaveSpec, ShadowServeMetadata

log = logging.getLogger(__name__)

SKIP = -1  # a block id the data plane must leave alone (vLLM already holds it)


@dataclass
class WorkerRequest(KVRequest):
    """One vLLM request as the KVCacheManager reads it (a ``KVRequest``), plus the tokens it should load."""

    request_id: str
    prompt_token_ids: list[int]
    block_ids: list[int]
    hit_tokens: int = 0
    cache_salt: str | None = None  # picks the key space, as on the scheduler side


class BlockLedger(BlockHolder):
    """Counts the manager's holds on vLLM blocks; vLLM allocates and frees them, never we."""

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.held: Counter[int] = Counter()

    def hold(self, block_ids) -> None:
        for b in block_ids:
            if b >= 0:
                self.held[b] += 1

    def release(self, block_ids) -> None:
        for b in block_ids:
            if b >= 0:
                self.held[b] -= 1
                if self.held[b] <= 0:
                    del self.held[b]

    def replace_blocks(self, request: KVRequest, first: int, last: int) -> bool:
        """vLLM's blocks cannot be swapped from here: a late fetch is waited for, not abandoned."""
        return False


FEEDBACK_LIMIT = 1024  # completions kept for the scheduler side between two steps (the newest win)


class TrackedBackend(FetchBackend):
    """Our data-plane backend, counting each request's saves in flight (to free blocks only after) and
    keeping its completions for the scheduler side (``take_feedback``)."""

    def __init__(self, inner: FetchBackend) -> None:
        self.inner = inner
        self.synchronous = inner.synchronous
        self._save_jobs: dict[int, str] = {}
        self.saving: Counter[str] = Counter()
        self.feedback: deque[Completion] = deque(maxlen=FEEDBACK_LIMIT)

    def submit(self, cmd: FetchCommand | SaveCommand) -> None:
        if isinstance(cmd, SaveCommand):
            self._save_jobs[cmd.job_id] = cmd.request_id
            self.saving[cmd.request_id] += 1
        self.inner.submit(cmd)

    def poll(self) -> list[Completion]:
        out = self.inner.poll()
        for c in out:
            if c.kind == "save":
                self._settled(c.job_id)
        self.feedback.extend(out)
        return out

    def _settled(self, job_id: int) -> None:
        rid = self._save_jobs.pop(job_id, None)
        if rid is not None:
            self.saving[rid] -= 1
            if self.saving[rid] <= 0:
                del self.saving[rid]

    def healthy(self) -> bool:
        return self.inner.healthy()

    def ready(self) -> bool:
        return self.inner.ready()

    def restart(self) -> None:
        self.inner.restart()  # nothing old can read or write after this: every save is over
        self._save_jobs.clear()
        self.saving.clear()
        self.feedback.clear()  # their tier events describe a tier that is gone

    def describe(self) -> str:
        return self.inner.describe()

    def down_reason(self) -> str:
        return self.inner.down_reason()

    def stats(self) -> dict:
        return self.inner.stats()

    def close(self) -> None:
        self.inner.close()


class WorkerSide:
    """vLLM's worker-process half of the connector; ``manager`` runs over a ``TrackedBackend``."""

    def __init__(self, manager: KVCacheManager, block_size: int, preemption_timeout: float) -> None:
        if not isinstance(manager.backend, TrackedBackend):
            raise TypeError("the worker side needs its manager's backend wrapped in a TrackedBackend")
        self.manager = manager
        self.backend: TrackedBackend = manager.backend
        self.block_size = block_size
        self.preemption_timeout = preemption_timeout
        self._loading: dict[str, WorkerRequest] = {}
        self._loaded_ok: dict[str, int] = {}  # request id -> prompt tokens that really landed
        self._ready: list[FetchEnded] = []  # loads ended, not yet reported to vLLM
        self._save_requests: set[str] = set()  # vLLM delays freeing these until we report them
        self._finished: set[str] = set()
        self._errors: set[int] = set()

    # ---- loads --------------------------------------------------------------------------------

    @property
    def loading(self) -> bool:
        """Loads submitted whose end vLLM has not been told yet."""
        return bool(self._loading)

    def start_loads(self, loads: list[LoadSpec]) -> None:
        """Submit one fetch per request; never waits for the data plane."""
        bs = self.block_size
        for spec in loads:
            local_blocks = spec.local_tokens // bs
            blocks = [SKIP] * local_blocks + list(spec.block_ids[local_blocks:])
            req = WorkerRequest(spec.request_id, list(spec.prompt_token_ids), blocks, spec.hit_tokens,
                                spec.cache_salt)
            self._loading[spec.request_id] = req
            if not self.manager.start_fetch(req, spec.local_tokens, spec.hit_tokens):
                # Refused (the data plane is restarting): nothing landed past vLLM's own blocks, which
                # take_finished reports as failed, so vLLM computes them.
                self._ready.append(FetchEnded(req, spec.local_tokens, None))

    def collect(self) -> None:
        """Take completions off the data plane; what ended is reported at the next ``take_finished``."""
        self._ready.extend(self.manager.poll())

    def take_finished(self, finished_req_ids: set[str]) -> tuple[set[str], set[str]]:
        """(finished sends, finished receives) since the last call; failed blocks go to ``take_errors``."""
        self.collect()
        recving = set()
        for ended in self._ready:
            req = ended.request
            assert isinstance(req, WorkerRequest)
            rid = req.request_id
            self._loading.pop(rid, None)
            recving.add(rid)
            landed = max(ended.computed_tokens, 0)
            self._loaded_ok[rid] = landed
            if landed < req.hit_tokens:
                failed = req.block_ids[landed // self.block_size : req.hit_tokens // self.block_size]
                self._errors.update(b for b in failed if b >= 0)
                log.info("shadowserve: load of %s ended at %d of %d tokens; vLLM recomputes the rest",
                         rid, landed, req.hit_tokens)
        self._ready = []
        self._finished |= finished_req_ids
        sending = set()
        for rid in list(self._finished):
            if rid in self.backend.saving:
                continue  # its save still reads the blocks
            self._finished.discard(rid)
            self._loaded_ok.pop(rid, None)
            self.manager.forget(WorkerRequest(rid, [], []))
            if rid in self._save_requests:
                self._save_requests.discard(rid)
                sending.add(rid)
        return sending, recving

    def take_feedback(self) -> tuple[list[Completion], int]:
        """The completions since the last call, and how many times the data plane has restarted."""
        out = list(self.backend.feedback)
        self.backend.feedback.clear()
        return out, self.manager.stats.dataplane_restarts

    def take_errors(self) -> set[int]:
        errors, self._errors = self._errors, set()
        return errors

    # ---- saves --------------------------------------------------------------------------------

    def start_saves(self, saves: list[SaveSpec]) -> None:
        """Hand computed chunks to the data plane; returns at once (the blocks stay held until done)."""
        for spec in saves:
            self._save_requests.add(spec.request_id)
            # Chunks whose load failed are saved again: the store heals from corrupt or lost chunks.
            stored = min(spec.stored_tokens, self._loaded_ok.get(spec.request_id, spec.stored_tokens))
            req = WorkerRequest(spec.request_id, list(spec.prompt_token_ids), list(spec.block_ids),
                                cache_salt=spec.cache_salt)
            self.manager.save(req, stored)

    def wait_for_preempted(self, meta: ShadowServeMetadata) -> None:
        """vLLM is about to reuse preempted requests' blocks: let their saves finish reading first."""
        deadline = time.monotonic() + self.preemption_timeout
        while any(rid in self.backend.saving for rid in meta.preempted) and time.monotonic() < deadline:
            self.collect()
            time.sleep(0.001)

    def close(self) -> None:
        self.manager.close()
