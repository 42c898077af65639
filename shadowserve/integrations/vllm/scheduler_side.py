"""The connector inside vLLM's scheduler: prefix lookups, load plans and save plans.

Lookups go through our KVCacheManager (the same one our own scheduler drives), so they run on its
thread pool and never block vLLM's scheduling loop: while one is out, vLLM is told "ask again"
(``None``) and schedules other requests. A hit becomes an asynchronous load (vLLM parks the request
in WAITING_FOR_REMOTE_KVS and keeps running the rest), and once a prompt is computed its new full
chunks are handed to the worker to save.

The worker's data plane runs the fetches, so this side learns from what the worker sends back each
step (``update_connector_output``): the completions feed the local-tier mirror and the link and decode
estimates, and each step that prefilled is timed from its plan here to its output coming back, for the
prefill estimate. With those, a lookup fetches only the leading chunks that beat computing them, as in
our own engine (controlplane/fetch_policy.py). That time includes vLLM's own overhead around the
forward pass (and, with asynchronous scheduling, any wait for the step before), so it errs towards
prefill looking slower, i.e. towards fetching.
"""

from __future__ import annotations

import time
from itertools import count
from typing import Any

from shadowserve.controlplane.manager import KVCacheManager
from shadowserve.controlplane.ports import BlockHolder
from shadowserve.engine.remote_kv import PENDING, KVRequest, StepWork, step_work
from shadowserve.integrations.vllm.config import ConnectorConfig
from shadowserve.integrations.vllm.metadata import (
    LoadSpec,
    SaveSpec,
    ShadowServeMetadata,
    ShadowServeWorkerMeta,
)

TIMED_STEPS = 64  # prefill steps awaiting their output; older ones (an output that never came) are dropped


class NoBlocks(BlockHolder):
    """The scheduler side only looks up; vLLM's own KV cache manager owns every block."""

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size

    def hold(self, block_ids: list[int]) -> None:
        raise NotImplementedError("the scheduler side never holds blocks: saves run on the worker")

    def release(self, block_ids: list[int]) -> None:
        raise NotImplementedError("the scheduler side never holds blocks: saves run on the worker")

    def replace_blocks(self, request: KVRequest, first: int, last: int) -> bool:
        return False


class SchedulerSide:
    """vLLM's scheduler-process half of the connector; ``manager`` answers lookups only."""

    def __init__(self, config: ConnectorConfig, block_size: int, manager: KVCacheManager) -> None:
        self.config = config
        self.block_size = block_size
        self.manager = manager
        self._requests: dict[str, Any] = {}  # request id -> vLLM Request, until it finishes
        self._matched: dict[str, tuple[int, int]] = {}  # request id -> (local tokens, hit tokens)
        self._planned: dict[str, int] = {}  # request id -> its preemption count when its load was planned
        self._hits: dict[str, int] = {}  # request id -> prompt tokens known to be in the store
        self._loads: list[LoadSpec] = []
        self._saved: set[str] = set()  # save handed to the worker (its blocks are freed late)
        self.kv_cache_manager = None  # vLLM's, bound after construction (for block ids at save time)
        self._step_ids = count()
        self._timed: dict[int, tuple[float, StepWork]] = {}  # step number -> (when planned, what it computes)
        self._worker_restarts = 0
        self._worker_starting = False  # the worker's restarted data plane is not ready yet: compute, do not load

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int | None, bool]:
        """Tokens beyond vLLM's local hit that the store holds; ``None`` while the lookup is out."""
        self._requests[request.request_id] = request
        if not self.config.enabled or request.prompt_token_ids is None:  # None: prompt embeddings
            return 0, False
        if self._worker_starting:  # its load would be refused (and reported failed); computing is what happens
            return 0, False
        if self._planned.get(request.request_id) == request.num_preemptions:
            # Asked again without a preemption: its load landed nothing (vLLM only asks requests with
            # no computed tokens). Compute it; offering the same hit again could fail forever.
            return 0, False
        hit = self.manager.lookup(request)
        if hit is PENDING:
            return None, False
        self._hits[request.request_id] = hit
        if hit <= num_computed_tokens:
            return 0, False
        self._matched[request.request_id] = (num_computed_tokens, hit)
        return hit - num_computed_tokens, True

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        """Blocks are allocated: plan the load of [hit - num_external_tokens, hit) into them."""
        matched = self._matched.pop(request.request_id, None)
        if num_external_tokens == 0 or matched is None:
            return
        hit = matched[1]
        self._planned[request.request_id] = request.num_preemptions
        block_ids = blocks.get_block_ids()[0][: hit // self.block_size]
        self._loads.append(LoadSpec(request.request_id, tuple(request.prompt_token_ids), tuple(block_ids),
                                    hit - num_external_tokens, hit, _salt(request)))

    def build_connector_meta(self, scheduler_output: Any) -> ShadowServeMetadata:
        """This step's loads, plus saves for prompts whose computation completes in this step."""
        saves = []
        if (self.config.enabled and self.config.dataplane.save and self.kv_cache_manager is not None
                and not self._worker_starting):  # the worker would drop them
            for rid, n in scheduler_output.num_scheduled_tokens.items():
                req = self._requests.get(rid)
                if req is None or rid in self._saved or req.prompt_token_ids is None:
                    continue
                prompt_len = len(req.prompt_token_ids)
                if req.num_computed_tokens + n < prompt_len or prompt_len < self.config.dataplane.chunk_size:
                    continue
                self._saved.add(rid)
                block_ids = self.kv_cache_manager.get_block_ids(rid)[0]
                saves.append(SaveSpec(rid, tuple(req.prompt_token_ids), tuple(block_ids), self._hits.get(rid, 0),
                                      _salt(req)))
        step = next(self._step_ids)
        self._time_step(step, scheduler_output.num_scheduled_tokens)
        meta = ShadowServeMetadata(self._loads, saves, frozenset(scheduler_output.preempted_req_ids or ()),
                                   idle=not scheduler_output.total_num_scheduled_tokens, step=step)
        self._loads = []
        return meta

    def _time_step(self, step: int, scheduled: dict[str, int]) -> None:
        """Note what a step that prefills will compute (read before vLLM advances the requests), as
        our engine does for its own steps; its time is taken when its output comes back."""
        parts = ((n, req.num_computed_tokens, len(req.prompt_token_ids)) for rid, n in scheduled.items()
                 if (req := self._requests.get(rid)) is not None and req.prompt_token_ids is not None)
        work = step_work(parts)
        if work.prefill_tokens:
            self._timed[step] = (time.perf_counter(), work)
            while len(self._timed) > TIMED_STEPS:
                del self._timed[next(iter(self._timed))]

    def update_connector_output(self, output: Any) -> None:
        """A step's output is back: time the prefill steps it ran, and learn from the worker's completions."""
        meta = getattr(output, "kv_connector_worker_meta", None)
        if not isinstance(meta, ShadowServeWorkerMeta):
            return
        now = time.perf_counter()
        for step in set(meta.steps):
            timed = self._timed.pop(step, None)
            if timed is not None:
                planned, work = timed
                self.manager.record_step(work.prefill_tokens, work.other_tokens, now - planned, work.pairs,
                                         work.kv_tokens)
        reset = meta.restarts != self._worker_restarts
        self._worker_restarts = meta.restarts
        self._worker_starting = meta.starting
        self.manager.learn(meta.completions, tier_reset=reset)

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        """Keep the blocks while the worker may still be reading them for a save."""
        rid = request.request_id
        self._requests.pop(rid, None)
        self._matched.pop(rid, None)
        self._planned.pop(rid, None)
        self._hits.pop(rid, None)
        self.manager.forget(request)
        delay = rid in self._saved
        self._saved.discard(rid)
        return delay, None

    def close(self) -> None:
        self.manager.close()


def _salt(request: Any) -> str | None:
    """The vLLM request's cache salt (vLLM checked it at its API); None on versions without the field."""
    return getattr(request, "cache_salt", None)
