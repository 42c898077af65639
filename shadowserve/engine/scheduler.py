"""Continuous batching: which requests run this step, and how many of their tokens.

Every step mixes decodes (one token per running request) with prefill chunks of new or partly
prefilled requests, within a token budget; a prompt longer than the budget is prefilled over
several steps, so decodes never wait behind a whole long prefill. When KV memory runs out the
newest running request is preempted (its blocks freed, recomputed later).

The scheduler is the only code that moves requests between states (WAITING -> FETCHING -> RUNNING ->
FINISHED) and writes their token counts: the remote KV cache behind its port (engine/remote_kv.py)
answers lookups and reports fetch ends, and the scheduler applies them.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import cast

from shadowserve.config import EngineConfig
from shadowserve.engine.block_manager import BlockManager
from shadowserve.engine.remote_kv import PENDING, FetchEnded, NoRemoteKV, RemoteKV
from shadowserve.engine.request import Request, RequestStatus


@dataclass
class ScheduledChunk:
    """``num_tokens`` of ``request``'s tokens, starting at its ``num_computed_tokens``, run this step."""

    request: Request
    num_tokens: int

    @property
    def completes(self) -> bool:
        """True when this chunk reaches the request's last known token, so a new token is sampled."""
        return self.request.num_computed_tokens + self.num_tokens == self.request.num_tokens


class Scheduler:
    """Picks each step's work and owns every request's state; ``remote_kv`` is NoRemoteKV for recompute."""

    def __init__(
        self,
        config: EngineConfig,
        block_manager: BlockManager,
        max_model_len: int,
        eos_token_ids: tuple[int, ...],
        remote_kv: RemoteKV | None = None,
    ) -> None:
        self.config = config
        self._eos = frozenset(eos_token_ids)
        self.block_manager = block_manager
        self.max_model_len = max_model_len
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.fetching: list[Request] = []  # holding blocks while the data plane lands their prefix
        self.num_preemptions = 0
        self.remote_kv: RemoteKV = remote_kv if remote_kv is not None else NoRemoteKV()

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.fetching)

    def abort(self, request_id: str) -> Request | None:
        for queue in (self.running, self.waiting, self.fetching):
            for req in queue:
                if req.request_id == request_id:
                    queue.remove(req)
                    self.remote_kv.abort(req)  # before the blocks are freed: the data plane may hold them
                    self._finish(req, "abort")
                    return req
        return None

    # ---- scheduling ---------------------------------------------------------------------------

    def schedule(self) -> list[ScheduledChunk]:
        self.collect_fetched()
        budget = self.config.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        preempted = False
        # Decodes first, then partly prefilled requests, each in arrival order.
        order = sorted(self.running, key=lambda r: (r.num_tokens - r.num_computed_tokens > 1))
        for req in order:
            if budget == 0:
                break
            if req.status != RequestStatus.RUNNING:
                continue  # preempted earlier in this loop
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            while not self.block_manager.ensure_slots(req, req.num_computed_tokens + n):
                victim = self.running[-1]
                self._preempt(victim)
                preempted = True
                if victim is req:
                    break
            if req.status != RequestStatus.RUNNING:
                continue
            chunks.append(ScheduledChunk(req, n))
            budget -= n
        for req in list(self.waiting):
            if budget == 0 or preempted or len(self.running) + len(self.fetching) >= self.config.max_num_seqs:
                break
            verdict = self._admit(req)
            if verdict == "pending":
                continue  # its prefix lookup is still out: let later requests go first
            if verdict == "full":
                break
            self.waiting.remove(req)
            if req.status == RequestStatus.RUNNING:
                n = min(req.num_tokens - req.num_computed_tokens, budget)
                chunks.append(ScheduledChunk(req, n))
                budget -= n
        return chunks

    def _admit(self, req: Request) -> str:
        """Give a waiting request blocks for all its tokens, reusing local prefix blocks.

        Returns "ok" (now RUNNING, or FETCHING its remote prefix), "pending" (the control plane's
        lookup is not answered yet) or "full" (not enough free KV blocks).
        """
        bm = self.block_manager
        cached = bm.match_prefix(req.all_token_ids, req.cache_salt)
        local = len(cached) * bm.block_size
        remote = 0
        fresh = req.num_computed_tokens == 0 and not req.output_token_ids  # not a preempted request
        if fresh:
            answer = self.remote_kv.lookup(req)
            if answer is PENDING:
                return "pending"
            remote = req.remote_hit_tokens = answer
            req.kv_decision = self.remote_kv.decision(req)
            if remote > local:
                # Fetches land whole chunks: keep only local blocks that form whole chunks.
                cs = self.remote_kv.chunk_size
                local = local // cs * cs
                cached = cached[: local // bm.block_size]
        if not bm.can_allocate(req, cached):
            return "full"
        bm.allocate(req, cached)
        req.num_computed_tokens = local
        req.num_cached_tokens = max(req.num_cached_tokens, local)
        if remote > local:
            start = time.perf_counter()  # before the call: a synchronous fetch runs inside it
            if self.remote_kv.start_fetch(req, local, remote):
                req.status = RequestStatus.FETCHING
                req.fetch_start_time = start
                self.fetching.append(req)
                if self.remote_kv.synchronous:
                    self.collect_fetched()
                return "ok"
        req.status = RequestStatus.RUNNING
        self.running.append(req)
        return "ok"

    def collect_fetched(self) -> None:
        """Requests whose fetch ended (landed, partly landed, or failed) join the running batch."""
        for ended in self.remote_kv.poll():
            req = self._apply_fetch_end(ended)
            if req in self.fetching:
                self.fetching.remove(req)
                self.running.append(req)

    def _apply_fetch_end(self, ended: FetchEnded) -> Request:
        """FETCHING -> RUNNING, with what landed and the fetch's end time on the request (its TTFT split)."""
        req = cast(Request, ended.request)  # the very request this scheduler handed to start_fetch
        req.num_computed_tokens = ended.computed_tokens
        # Chunks that failed (corrupt, vanished) get saved again after the prefill: the store heals.
        req.remote_hit_tokens = ended.computed_tokens
        if ended.fetched_tokens is not None:
            req.num_fetched_tokens = ended.fetched_tokens
        req.status = RequestStatus.RUNNING
        req.fetch_end_time = now = time.perf_counter()
        req.fetch_seconds = (req.fetch_seconds or 0.0) + now - req.fetch_start_time
        if ended.fetched_tokens is not None:
            self.block_manager.register_computed(req)  # fetched blocks become reusable by later prefix matches
        return req

    def _preempt(self, req: Request) -> None:
        self.block_manager.free_request(req)
        self.running.remove(req)
        req.status = RequestStatus.WAITING
        req.num_computed_tokens = 0
        self.waiting.appendleft(req)
        self.num_preemptions += 1

    # ---- after the model ran ------------------------------------------------------------------

    def update(self, chunks: list[ScheduledChunk], sampled: dict[str, int]) -> list[Request]:
        """Advance requests by what this step computed and sampled; return those that finished."""
        now = time.perf_counter()
        finished = []
        for chunk in chunks:
            req = chunk.request
            req.num_computed_tokens += chunk.num_tokens
            self.block_manager.register_computed(req)
            if req.num_computed_tokens >= len(req.prompt_token_ids):
                self.remote_kv.save(req, req.remote_hit_tokens)
            token = sampled.get(req.request_id)
            if token is None:
                continue
            req.output_token_ids.append(token)
            req.token_times.append(now)
            if req.first_token_time is None:
                req.first_token_time = now
            reason = self._stop_reason(req, token)
            if reason:
                self.running.remove(req)
                self._finish(req, reason)
                finished.append(req)
        return finished

    def _stop_reason(self, req: Request, token: int) -> str | None:
        sp = req.sampling
        if (not sp.ignore_eos and token in self._eos) or token in sp.stop_token_ids:
            return "stop"
        if len(req.output_token_ids) >= sp.max_tokens or req.num_tokens >= self.max_model_len:
            return "length"
        return None

    def _finish(self, req: Request, reason: str) -> None:
        self.remote_kv.forget(req)
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
        req.finish_time = time.perf_counter()
        self.block_manager.free_request(req)
