"""The step loop: schedule -> run the model on decodes and prefill chunks together -> sample -> finish."""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable

import torch

from shadowserve.config import CodecConfig, DataPlaneConfig, EngineConfig, parse_size
from shadowserve.engine.block_manager import BlockManager
from shadowserve.engine.kv_pool import KVPool, bytes_per_block
from shadowserve.engine.model_runner import ModelRunner
from shadowserve.engine.sampler import Sampler
from shadowserve.engine.scheduler import Scheduler
from shadowserve.engine.sequence import Request, RequestOutput, SamplingParams
from shadowserve.errors import ConfigError, ModelError
from shadowserve.kvcache.levels import DEFAULT_QUALITY, QUALITY_LEVELS
from shadowserve.model.loader import LoadedModel, load_model, torch_dtype


class LLMEngine:
    """Owns the model, the KV pool and the scheduler; ``step()`` advances every active request.

    With a store URL and a fetch mode other than ``recompute``, a control plane (KVCacheManager)
    sits beside the scheduler and a data plane lands cached prefixes straight into the KV pool.
    """

    def __init__(
        self,
        config: EngineConfig,
        loaded: LoadedModel | None = None,
        progress: bool = True,
        dataplane: DataPlaneConfig | None = None,
        store_url: str | None = None,
        codec: CodecConfig | None = None,
    ) -> None:
        self.config = config
        self.dataplane_config = dataplane or DataPlaneConfig(fetch_mode="recompute")
        remote = store_url is not None and self.dataplane_config.fetch_mode != "recompute"
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
        self.pool = KVPool(arch, num_blocks, config.block_size, dtype, config.device, shared)
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(config, self.block_manager, self.max_model_len, self.tokenizer.eos_token_ids)
        self.sampler = Sampler(config.seed)
        self.runner = ModelRunner(self.loaded.model, self.pool, self.sampler)
        self._ids = itertools.count()
        self._on_token: dict[str, Callable[[Request, int], None]] = {}
        self.kv_manager = None
        if remote:
            try:
                self.kv_manager = self._build_control_plane(store_url, codec or QUALITY_LEVELS[DEFAULT_QUALITY])
            except BaseException:
                self.pool.close()  # a shared pool would otherwise outlive us in /dev/shm
                self._restore_affinity()
                raise
            self.scheduler.kv_manager = self.kv_manager

    def _build_control_plane(self, store_url: str, codec_config: CodecConfig):
        from shadowserve.controlplane.manager import KVCacheManager
        from shadowserve.dataplane.modes import buffer_layout, create_backend
        from shadowserve.dataplane.process import DataPlaneSpec
        from shadowserve.kvcache.chunking import chunk_keys, key_seed
        from shadowserve.kvcache.codec import KVCodec
        from shadowserve.store.base import open_store

        dp = self.dataplane_config
        if dp.fetch_mode == "offload" and store_url.startswith("memory:"):
            raise ConfigError("a memory:// store lives inside this process, where the offload data plane "
                              "cannot see it: use file:///dir, shadowserve://host:port or redis://")
        if dp.chunk_size % self.config.block_size:
            raise ConfigError(f"chunk_size {dp.chunk_size} must be a multiple of block_size {self.config.block_size}")
        codec = KVCodec(codec_config, self.loaded.fingerprint)
        seed = key_seed(self.loaded.fingerprint, codec.kv_format_id)
        arch = self.loaded.arch
        chunk_shape = (arch.num_hidden_layers, 2, dp.chunk_size, arch.num_key_value_heads, arch.head_dim)
        layout = buffer_layout(chunk_shape, self.pool.tensor.element_size(), codec)
        handle = self.pool.handle() if dp.fetch_mode == "offload" else None
        spec = DataPlaneSpec(dp, store_url, codec_config, self.loaded.fingerprint, handle, layout,
                             tuple(self.dataplane_cores))
        lookup_store = open_store(store_url)
        backend = create_backend(spec, self.pool.tensor)
        return KVCacheManager(dp, self.block_manager, backend, lookup_store,
                              lambda ids: chunk_keys(ids, dp.chunk_size, seed))

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
        sampled = self.runner.run(chunks)
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
        if self.kv_manager is not None:
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
        )

    def _forget(self, request_id: str) -> None:
        self._on_token.pop(request_id, None)
        self.sampler.forget(request_id)

    def flush(self, timeout: float = 60.0) -> None:
        """Wait until the data plane has settled every fetch and save (e.g. before a warm pass)."""
        deadline = time.monotonic() + timeout
        while self.kv_manager is not None and self.kv_manager.busy and time.monotonic() < deadline:
            self.kv_manager.poll()
            time.sleep(0.002)

    def close(self) -> None:
        if self.kv_manager is not None:
            self.kv_manager.close()
            self.kv_manager = None
        self.pool.close()
        self._restore_affinity()

    def _restore_affinity(self) -> None:
        if self._unpinned is not None:
            cores, threads = self._unpinned
            os.sched_setaffinity(0, cores)
            torch.set_num_threads(threads)
            self._unpinned = None
