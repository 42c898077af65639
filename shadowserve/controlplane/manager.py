"""The KV cache manager: the control plane that sits beside the scheduler.

It answers "how much of this prompt's prefix does the store hold?" without ever blocking the step
loop (lookups run on a small thread pool; a request waits in WAITING until its answer is in),
turns a hit into a FetchCommand for the request's own KV blocks, and reports the fetch's end
(``FetchEnded``) when the data plane completes it. Failures, timeouts and a dead data plane all end
the same way: the request computes the prefix itself. After a prefill, new full chunks go back to
the store through the same data plane.

It implements the engine's remote-KV port (engine/remote_kv.py) and never writes a request: the
caller's scheduler applies what ``poll`` returns. It reads requests and holds blocks only through
the declared protocols (``KVRequest``, ``BlockHolder``), so other engines (the vLLM connector) drive
the same calls: ``lookup``, ``start_fetch``, ``poll``, ``save``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import count

from shadowserve.config import DataPlaneConfig
from shadowserve.controlplane.fetch_policy import FetchPolicy
from shadowserve.controlplane.ports import BlockHolder, KeyFn
from shadowserve.controlplane.stats import ManagerStats
from shadowserve.controlplane.store_health import StoreHealth
from shadowserve.controlplane.tier_directory import TierDirectory
from shadowserve.dataplane.backends import FetchBackend
from shadowserve.dataplane.messages import Completion, FetchCommand, SaveCommand
from shadowserve.engine.remote_kv import PENDING, FetchEnded, KVRequest, Pending, PromptRequest
from shadowserve.errors import ShadowServeError, StoreUnavailable

log = logging.getLogger("shadowserve.controlplane")
PROBE_KEY = b"shadowserve-probe"  # never a chunk key (those are 16-byte hashes)


@dataclass
class _Fetch:
    request: KVRequest
    first_chunk: int
    keys: tuple[bytes, ...]
    blocks: list[int]  # every destination block of this job, in order
    deadline: float
    start: float = field(default_factory=time.perf_counter)


class KVCacheManager:
    """The control plane: implements the engine's RemoteKV port over a data-plane backend and a store.

    Runs in the engine's process (vLLM: in its scheduler and in each worker); lookups run on its own
    thread pool, fetches and saves on the backend (``synchronous``: inside ``submit``).
    """

    def __init__(
        self,
        config: DataPlaneConfig,
        block_manager: BlockHolder,
        backend: FetchBackend,
        lookup_store,
        key_fn: KeyFn,
        store_url: str = "",
    ) -> None:
        """``key_fn(token_ids) -> list[bytes]`` gives the chained keys of the full chunks of a prompt;
        ``store_url`` names the store in logs and /health (secrets masked)."""
        self.config = config
        self.bm = block_manager
        self.backend = backend
        self.store = lookup_store
        self.key_fn = key_fn
        self.chunk_size = config.chunk_size
        self.blocks_per_chunk = config.chunk_size // block_manager.block_size
        self.stats = ManagerStats()
        self._lookup_pool = ThreadPoolExecutor(config.lookup_workers, thread_name_prefix="kv-lookup")
        self._lookups: dict[str, Future] = {}
        self._keys: dict[str, list[bytes]] = {}
        self._jobs = count()
        self._fetches: dict[int, _Fetch] = {}
        self._inflight_keys: dict[bytes, int] = {}
        self._saves: dict[int, list[int]] = {}  # job -> blocks held while the data plane reads them
        self._abandoned: dict[int, list[int]] = {}  # job -> blocks the data plane may still write
        self._saved_requests: set[str] = set()
        self._counted: set[str] = set()
        self._held: dict[str, int] = {}  # request -> leading chunks the tier or store held at lookup
        self.policy = FetchPolicy(config)  # fetch or recompute, from measured rates
        self.tier = TierDirectory()  # what the data plane's local tier holds
        self._last_restart = time.monotonic()
        self._restarting = False  # a restarted data plane not yet ready (logged once it is)
        self.store_health = StoreHealth(store_url or repr(lookup_store), config.store_probe_interval)
        self.stats.store_errors = self.store_health.errors
        self._probe: Future | None = None
        self._last_probe = float("-inf")
        if lookup_store is not None:
            self._start_probe()  # an unreachable store is reported at start-up, not at the first request

    @property
    def synchronous(self) -> bool:
        """A fetch runs inside ``start_fetch`` (sync mode): poll right after to collect it."""
        return self.backend.synchronous

    # ---- lookup -------------------------------------------------------------------------------

    def keys(self, req: PromptRequest) -> list[bytes]:
        keys = self._keys.get(req.request_id)
        if keys is None:
            # getattr: a request without the field (an older vLLM's) is unsalted.
            salt = getattr(req, "cache_salt", None)
            keys = self._keys[req.request_id] = self.key_fn(req.prompt_token_ids, salt)
        return keys

    def lookup(self, req: PromptRequest) -> int | Pending:
        """Cached prefix tokens in the store for this request, or PENDING while the answer is out."""
        keys = self.keys(req)
        # Never the whole prompt: at least one token must run to produce logits.
        usable = min(len(keys), (len(req.prompt_token_ids) - 1) // self.chunk_size)
        if usable == 0:
            return 0
        fut = self._lookups.get(req.request_id)
        if fut is None:
            # The tier directory is local: a prefix it holds whole needs no store round trip, so it is
            # answered now and the request is admitted in this very step (not after a pool hop and a poll).
            if self.backend.synchronous or self.tier.run(keys[:usable]) == usable:
                fut = _done_future(self._longest_prefix(keys[:usable]))
            else:
                fut = self._lookup_pool.submit(self._longest_prefix, keys[:usable])
            self._lookups[req.request_id] = fut
        if not fut.done():
            return PENDING
        held = fut.result()
        if req.request_id not in self._counted:
            self._counted.add(req.request_id)
            self.stats.prefix_lookup_tokens += len(req.prompt_token_ids)
            self.stats.prefix_hit_tokens += held * self.chunk_size
            self._held[req.request_id] = held
            self.policy.decide(req.request_id, len(req.prompt_token_ids), [k in self.tier for k in keys[:held]])
        decision = self.policy.decision(req.request_id)
        hit = decision.fetch_chunks if decision is not None else held
        # Chunks another request is fetching right now: wait for them to land locally, then reuse them.
        if any(k in self._inflight_keys for k in keys[:hit]):
            return PENDING
        return hit * self.chunk_size

    def _longest_prefix(self, keys: list[bytes]) -> int:
        run = self.tier.run(keys)
        if run == len(keys):
            return run  # all in the local tier: the store was not asked, so it says nothing of the store
        try:
            hit = self.tier.longest_prefix(self.store, keys)
        except ShadowServeError as exc:
            self._store_failed(exc)
            return run  # the store is unreachable: the tier's chunks still serve, the rest is computed
        self.store_health.answered()
        return hit

    def _store_failed(self, exc: ShadowServeError) -> None:
        if isinstance(exc, StoreUnavailable):
            self.store_health.unreachable(str(exc))
        else:
            self.store_health.failed("other", error=str(exc))

    def _start_probe(self) -> None:
        self._last_probe = time.monotonic()
        self._probe = self._lookup_pool.submit(self._probe_store)

    def _probe_store(self) -> None:
        """Runs on the lookup pool: one cheap call, so the store's state is known while no request asks."""
        try:
            self.store.contains([PROBE_KEY])
        except ShadowServeError as exc:
            self._store_failed(exc)
        except Exception as exc:  # a backend bug must not stop the probes
            self.store_health.failed("other", error=f"{type(exc).__name__}: {exc}")
        else:
            self.store_health.answered()

    # ---- fetch --------------------------------------------------------------------------------

    def start_fetch(self, req: KVRequest, local_tokens: int, hit_tokens: int) -> bool:
        """Fetch chunks [local_tokens, hit_tokens) into the request's blocks; True if a fetch started.

        ``local_tokens`` (already in the request's blocks) must be a multiple of the chunk size.
        """
        first, last = local_tokens // self.chunk_size, hit_tokens // self.chunk_size
        if last <= first:
            return False
        if not self.backend.ready():  # a restarted data plane is still starting: computing beats waiting
            self.stats.skipped_while_restarting += 1
            return False
        keys = tuple(self.keys(req)[first:last])
        bpc = self.blocks_per_chunk
        per_chunk = tuple(tuple(req.block_ids[c * bpc : (c + 1) * bpc]) for c in range(first, last))
        job = next(self._jobs)
        self._fetches[job] = _Fetch(req, first, keys, [b for blk in per_chunk for b in blk],
                                    time.monotonic() + self.config.fetch_timeout)
        for k in keys:
            self._inflight_keys[k] = job
        self.backend.submit(FetchCommand(job, req.request_id, keys, per_chunk))
        return True

    def poll(self) -> list[FetchEnded]:
        """Take completions, timeouts and liveness; return the fetches that ended, for the caller to apply."""
        ready: list[FetchEnded] = []
        for c in self.backend.poll():
            ready.extend(self._complete(c))
        now = time.monotonic()
        for job, f in list(self._fetches.items()):
            if now > f.deadline:
                ready.extend(self._abandon(job, "timed out"))
        if self.store is not None and (self._probe is None or self._probe.done()):
            interval = self.config.store_probe_interval / (5 if self.store_health.up is False else 1)
            if now - self._last_probe > interval:
                self._start_probe()
        if not self.backend.healthy():
            if self._fetches or self._saves or self._abandoned:
                ready.extend(self._fail_over())
            elif now - self._last_restart > self.config.heartbeat_timeout:
                self._fail_over()  # idle but dead: be ready before the next request, not after it fails
        elif self._restarting and self.backend.ready():
            self._restarting = False
            log.warning("data plane ready again after %.1f s (%s)", now - self._last_restart, self.backend.describe())
        return ready

    def _complete(self, c: Completion) -> list[FetchEnded]:
        self._observe(c)
        for kind, n in c.error_kinds.items():
            self.store_health.failed(kind, n, c.error)
        if c.store_bytes or (c.kind == "save" and c.ok_chunks):  # the store itself served or took chunks
            self.store_health.answered()
        if c.kind == "save":
            blocks = self._saves.pop(c.job_id, None)
            if blocks is not None:
                self.bm.release(blocks)
            self.stats.saved_chunks += c.ok_chunks
            self.stats.save_failures += c.num_chunks - c.ok_chunks
            return []
        late = self._abandoned.pop(c.job_id, None)
        if late is not None:  # its request already moved on; now the blocks are safe to reuse
            self.bm.release(late)
            return []
        f = self._fetches.pop(c.job_id, None)
        if f is None:
            return []
        self._clear_inflight(f)
        self.stats.fetches += 1
        self.stats.fetch_bytes += c.nbytes
        self.stats.fetch_seconds += c.seconds
        for source, chunks, nbytes in (("tier", c.tier_chunks, c.tier_bytes),
                                       ("store", c.ok_chunks - c.tier_chunks, c.store_bytes)):
            self.stats.fetched_chunks[source] += chunks
            self.stats.fetched_bytes[source] += nbytes
        if not c.ok:
            self.stats.fetch_failures += 1
            rid = f.request.request_id  # what failed is saved again after the prefill: the store heals
            self._held[rid] = min(self._held.get(rid, 0), f.first_chunk + c.ok_chunks)
        fetched = c.ok_chunks * self.chunk_size
        self.stats.fetched_tokens += fetched
        # The scheduler then treats what landed as computed; chunks that failed are recomputed (and saved again).
        return [FetchEnded(f.request, (f.first_chunk + c.ok_chunks) * self.chunk_size, fetched)]

    def _abandon(self, job: int, why: str) -> list[FetchEnded]:
        """Give up on a fetch whose data plane may still write: fresh blocks for the request."""
        f = self._fetches[job]
        req = f.request
        first = f.first_chunk * self.blocks_per_chunk
        self.bm.hold(f.blocks)  # the quarantine's own reference, dropped when the job is settled
        if not self.bm.replace_blocks(req, first, first + len(f.blocks)):
            self.bm.release(f.blocks)
            return []  # no memory for fresh blocks yet; retry next step
        del self._fetches[job]
        self._abandoned[job] = f.blocks
        self._clear_inflight(f)
        self.stats.fetch_failures += 1
        self.store_health.failed("timeout", error=why)
        log.warning("fetch of %d chunk(s) for request %s %s; it computes them instead",
                    len(f.keys), req.request_id, why)
        return [FetchEnded(req, f.first_chunk * self.chunk_size, None)]

    def _fail_over(self) -> list[FetchEnded]:
        """The data plane died or hung: restart it (so nothing old can write) and recompute."""
        log.warning("data plane down (%s) with %d fetch(es) and %d save(s) in flight; restarting it, "
                    "their requests compute their prefixes", self.backend.down_reason(), len(self._fetches),
                    len(self._saves))
        self.backend.restart()  # returns at once; until the new process is ready, requests compute
        log.warning("data plane restarting (%s); requests compute their prefixes until it is ready",
                    self.backend.describe())
        self._restarting = True
        self.stats.dataplane_restarts += 1
        self.tier.clear()  # the tier died with the old pipeline
        self._last_restart = time.monotonic()
        for blocks in self._abandoned.values():
            self.bm.release(blocks)
        self._abandoned.clear()
        for blocks in self._saves.values():
            self.bm.release(blocks)
        self.stats.save_failures += len(self._saves)
        self._saves.clear()
        ready = []
        for f in self._fetches.values():
            self._clear_inflight(f)
            self.stats.fetch_failures += 1
            ready.append(FetchEnded(f.request, f.first_chunk * self.chunk_size, None))
        self._fetches.clear()
        return ready

    def _clear_inflight(self, f: _Fetch) -> None:
        for k in f.keys:
            self._inflight_keys.pop(k, None)

    # ---- save ---------------------------------------------------------------------------------

    def save(self, req: KVRequest, stored_tokens: int) -> None:
        """After the prompt is computed, store its full chunks past ``stored_tokens`` (known to be there)."""
        if not self.config.save or req.request_id in self._saved_requests:
            return
        self._saved_requests.add(req.request_id)
        if not self.backend.ready():  # dropped, not queued: a later request with this prefix saves it
            self.stats.skipped_while_restarting += 1
            return
        keys = self.keys(req)
        # Chunks the store held at lookup are not written again, fetched or not (the decision may compute them).
        first = max(stored_tokens // self.chunk_size, self._held.get(req.request_id, 0))
        if first >= len(keys):
            return
        bpc = self.blocks_per_chunk
        per_chunk = tuple(tuple(req.block_ids[c * bpc : (c + 1) * bpc]) for c in range(first, len(keys)))
        blocks = [b for blk in per_chunk for b in blk]
        self.bm.hold(blocks)
        job = next(self._jobs)
        self._saves[job] = blocks
        self.backend.submit(SaveCommand(job, req.request_id, tuple(keys[first:]), per_chunk))

    # ---- request lifecycle --------------------------------------------------------------------

    def abort(self, req: KVRequest) -> None:
        """A FETCHING request is going away: its blocks stay held until the data plane lets go."""
        for job, f in list(self._fetches.items()):
            if f.request is req:
                del self._fetches[job]
                self._clear_inflight(f)
                self.bm.hold(f.blocks)
                self._abandoned[job] = f.blocks
        self.forget(req)

    def learn(self, completions: Iterable[Completion], tier_reset: bool = False) -> None:
        """Completions of a data plane this manager does not drive (vLLM's worker runs the fetches):
        its tier directory and fetch-or-recompute estimates learn from them as from its own.
        ``tier_reset``: that data plane restarted since, and its local tier is empty."""
        if tier_reset:
            self.tier.clear()
        for c in completions:
            self._observe(c)

    def _observe(self, c: Completion) -> None:
        """What any completion teaches: the tier's key changes and the fetch-or-recompute estimates."""
        self.tier.apply(c.tier_events)
        self.policy.observe(c)

    def record_step(self, prefill_tokens: int, other_tokens: int, seconds: float, pairs: int = 0,
                    kv_tokens: int = 0) -> None:
        """The engine timed a step that prefilled: the prefill-cost estimate learns from it."""
        self.policy.observe_step(prefill_tokens, other_tokens, seconds, pairs, kv_tokens)

    def decision(self, req: PromptRequest) -> dict | None:
        """This request's fetch-or-recompute decision and the estimates behind it (None before lookup)."""
        d = self.policy.decision(req.request_id)
        return None if d is None else d.as_dict()

    def forget(self, req: PromptRequest) -> None:
        self._keys.pop(req.request_id, None)
        self._held.pop(req.request_id, None)
        self.policy.forget(req.request_id)
        self._saved_requests.discard(req.request_id)
        self._counted.discard(req.request_id)
        fut = self._lookups.pop(req.request_id, None)
        if fut is not None:
            fut.cancel()

    @property
    def busy(self) -> bool:
        return bool(self._fetches or self._saves or self._abandoned)

    def close(self) -> None:
        self._lookup_pool.shutdown(wait=False, cancel_futures=True)
        self.backend.close()


def _done_future(value: int) -> Future:
    fut: Future = Future()
    fut.set_result(value)
    return fut
