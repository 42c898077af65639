"""The step loop: schedule -> run the model on decodes and prefill chunks together -> sample -> finish."""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections.abc import Callable

import torch

from shadowserve.config import DataPlaneConfig, EngineConfig
from shadowserve.cores import explain_split
from shadowserve.engine.block_manager import BlockManager
from shadowserve.engine.kv_pool import KVPool, bytes_per_block
from shadowserve.engine.model_runner import ModelRunner
from shadowserve.engine.remote_kv import KVHost, NoRemoteKV, RemoteKV, RemoteKVFactory, step_work
from shadowserve.engine.request import Request, RequestOutput, SamplingParams
from shadowserve.engine.sampler import Sampler
from shadowserve.engine.scheduler import Scheduler
from shadowserve.errors import ModelError
from shadowserve.model.loader import LoadedModel, load_model, torch_dtype
from shadowserve.values import parse_size

log = logging.getLogger("shadowserve.engine")


class LLMEngine:
    """Owns the model, the KV pool and the scheduler; ``step()`` advances every active request.

    With ``remote_kv`` (a factory, e.g. the control plane's builder as wired by ``shadowserve.llm.
    create_engine``), a remote KV cache sits behind the scheduler's port and a data plane lands cached
    prefixes straight into the KV pool; without it every prefix is computed.
    """

    def __init__(
        self,
        config: EngineConfig,
        loaded: LoadedModel | None = None,
        progress: bool = True,
        dataplane: DataPlaneConfig | None = None,
        remote_kv: RemoteKVFactory | None = None,
    ) -> None:
        self.config = config
        self.dataplane_config = dataplane or DataPlaneConfig(fetch_mode="recompute")
        remote = remote_kv is not None
        engine_cores, self.dataplane_cores = self.dataplane_config.split_cores()
        self._unpinned: tuple[set[int], int] | None = None
        if self.dataplane_config.pin_cores:
            # Fairness: the engine computes on the same cores in every mode (recompute too); the
            # data-plane cores play the SmartNIC. Pinned before torch starts its worker threads,
            # unpinned on close: otherwise the next engine of this process would split the engine's
            # cores again and give its data plane fewer cores (or the engine's own).
            self._unpinned = (os.sched_getaffinity(0), torch.get_num_threads())
            os.sched_setaffinity(0, engine_cores)
            torch.set_num_threads(len(engine_cores))
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        log.info("cores: %s", explain_split(self.dataplane_config.dataplane_cores, engine_cores,
                                            self.dataplane_cores, self.dataplane_config.pin_cores, remote,
                                            self.dataplane_config.pipeline_on_engine_cores()))
        self.loaded = loaded or load_model(config.model, config.dtype, config.device, progress=progress)
        self.loaded.model.use_linear_kernel(config.linear_kernel)
        arch = self.loaded.arch
        self.tokenizer = self.loaded.tokenizer
        self.max_model_len = min(config.max_model_len or arch.max_position_embeddings, arch.max_position_embeddings)
        dtype = torch_dtype(config.dtype)
        num_blocks = config.num_kv_blocks or parse_size(config.kv_cache_memory) // bytes_per_block(
            arch, config.block_size, dtype
        )
        shared = config.shared_kv_pool or (remote and self.dataplane_config.fetch_mode == "offload")
        self.kv_pool = KVPool(arch, num_blocks, config.block_size, dtype, config.device, shared)
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.remote_kv: RemoteKV = NoRemoteKV()
        if remote_kv is not None:
            host = KVHost(self.kv_pool, self.block_manager, arch, self.loaded.fingerprint, config.block_size,
                          tuple(self.dataplane_cores), tuple(engine_cores))
            try:
                self.remote_kv = remote_kv(host)
            except BaseException:
                self.kv_pool.close()  # a shared pool would otherwise outlive us in /dev/shm
                self._restore_affinity()
                raise
        self.scheduler = Scheduler(config, self.block_manager, self.max_model_len, self.tokenizer.eos_token_ids,
                                   self.remote_kv)
        self.sampler = Sampler(config.seed)
        self.runner = ModelRunner(self.loaded.model, self.kv_pool, self.sampler)
        self._ids = itertools.count()
        self._on_token: dict[str, Callable[[Request, int], None]] = {}

    @property
    def kv_manager(self) -> RemoteKV | None:
        """The remote KV cache behind the port, or None for recompute.

        Callers above the engine (server metrics and health, benchmarks, tests) read the control plane's
        stats and backend through it; the engine itself only ever calls the port.
        """
        return None if isinstance(self.remote_kv, NoRemoteKV) else self.remote_kv

    # ---- requests -----------------------------------------------------------------------------

    def add_request(
        self,
        prompt: str | list[int],
        sampling: SamplingParams | None = None,
        request_id: str | None = None,
        on_token: Callable[[Request, int], None] | None = None,
    ) -> Request:
        """Queue a request; raises ModelError for a prompt the engine can never serve."""
        sampling = sampling or SamplingParams()
        if isinstance(prompt, str):
            text, token_ids = prompt, self.tokenizer.encode(prompt)
        else:
            text, token_ids = None, [int(t) for t in prompt]
        if not token_ids:
            raise ModelError("the prompt is empty")
        vocab = self.loaded.arch.vocab_size
        if min(token_ids) < 0 or max(token_ids) >= vocab:
            raise ModelError(f"prompt token ids must be in [0, {vocab})")
        if len(token_ids) >= self.max_model_len:
            raise ModelError(
                f"the prompt has {len(token_ids)} tokens but the model's context is {self.max_model_len}; "
                "shorten it"
            )
        needed = self.block_manager.blocks_needed(min(len(token_ids) + sampling.max_tokens, self.max_model_len))
        if needed > self.block_manager.num_blocks:
            raise ModelError(
                f"the request needs {needed} KV blocks but the pool has {self.block_manager.num_blocks}; "
                "raise kv_cache_memory or lower max_tokens"
            )
        req = Request(request_id or f"req-{next(self._ids)}", token_ids, sampling, prompt=text)
        if on_token is not None:
            self._on_token[req.request_id] = on_token
        self.scheduler.add(req)
        return req

    def abort_request(self, request_id: str) -> bool:
        req = self.scheduler.abort(request_id)
        self._forget(request_id)
        return req is not None

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- the loop -----------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one batch; returns the outputs of requests that finished in it."""
        chunks = self.scheduler.schedule()
        if not chunks:
            if self.scheduler.fetching or self.scheduler.waiting:
                time.sleep(0.0005)  # only waiting on lookups or fetches: do not spin the engine core
            return []
        # Recompute: nobody weighs prefill against fetches, so the step's work is not counted.
        work = step_work((c.num_tokens, c.request.num_computed_tokens, len(c.request.prompt_token_ids))
                         for c in chunks) if not isinstance(self.remote_kv, NoRemoteKV) else None
        t0 = time.perf_counter()
        sampled = self.runner.run(chunks)
        if work is not None and work.prefill_tokens:  # the prefill cost the control plane weighs fetches against
            self.remote_kv.record_step(work.prefill_tokens, work.other_tokens, time.perf_counter() - t0,
                                       work.pairs, work.kv_tokens)
        finished = self.scheduler.update(chunks, sampled)
        if self._on_token:
            for c in chunks:
                cb = self._on_token.get(c.request.request_id)
                tok = sampled.get(c.request.request_id)
                if cb is not None and tok is not None:
                    cb(c.request, tok)
        outputs = [self.output_of(r) for r in finished]
        for r in finished:
            self._forget(r.request_id)
        return outputs

    def check_liveness(self) -> None:
        """Let the control plane notice (and restart) a dead data plane while no request is running."""
        self.scheduler.collect_fetched()

    def output_of(self, req: Request) -> RequestOutput:
        ttft, tpot = req.ttft, req.tpot
        return RequestOutput(
            request_id=req.request_id,
            prompt=req.prompt,
            prompt_token_ids=req.prompt_token_ids,
            token_ids=list(req.output_token_ids),
            text=self.tokenizer.decode(req.output_token_ids),
            finished=req.is_finished,
            finish_reason=req.finish_reason,
            ttft_ms=None if ttft is None else ttft * 1e3,
            tpot_ms=None if tpot is None else tpot * 1e3,
            num_cached_tokens=req.num_cached_tokens,
            num_fetched_tokens=req.num_fetched_tokens,
            fetch_ms=None if req.fetch_seconds is None else req.fetch_seconds * 1e3,
            kv_decision=req.kv_decision,
        )

    def _forget(self, request_id: str) -> None:
        self._on_token.pop(request_id, None)
        self.sampler.forget(request_id)

    def flush(self, timeout: float = 60.0) -> None:
        """Wait until the data plane has settled every fetch and save (e.g. before a warm pass)."""
        deadline = time.monotonic() + timeout
        while self.remote_kv.busy and time.monotonic() < deadline:
            self.scheduler.collect_fetched()
            time.sleep(0.002)

    def close(self) -> None:
        self.remote_kv.close()
        self.remote_kv = NoRemoteKV()
        self.scheduler.remote_kv = self.remote_kv
        self.kv_pool.close()
        self._restore_affinity()

    def _restore_affinity(self) -> None:
        if self._unpinned is not None:
            cores, threads = self._unpinned
            os.sched_setaffinity(0, cores)
            torch.set_num_threads(threads)
            self._unpinned = None
