"""ShadowServeConnector: vLLM's v1 KV connector API over our control plane, data plane and store.

vLLM builds one instance per role: the SCHEDULER one answers prefix lookups and plans loads and
saves (scheduler_side.py); each WORKER one owns a data plane writing straight into vLLM's KV blocks
(worker_side.py). Loads are asynchronous (``load_async=True``): vLLM keeps scheduling other
requests while a prefix lands, and a failed chunk is reported as failed blocks, which vLLM
recomputes.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from shadowserve.controlplane.builder import KVTarget, build_kv_manager, build_lookup_manager
from shadowserve.cores import auto_dataplane_cores
from shadowserve.dataplane.shared_pool import SharedTensorHandle
from shadowserve.errors import ConfigError
from shadowserve.integrations.vllm.config import ConnectorConfig, model_fingerprint, parse_extra_config
from shadowserve.integrations.vllm.kv_view import kv_tensor_view, share
from shadowserve.integrations.vllm.metadata import ShadowServeMetadata, ShadowServeWorkerMeta
from shadowserve.integrations.vllm.scheduler_side import NoBlocks, SchedulerSide
from shadowserve.integrations.vllm.stats import CounterDelta, ShadowServePromMetrics, ShadowServeStats
from shadowserve.integrations.vllm.worker_side import BlockLedger, TrackedBackend, WorkerSide

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

log = logging.getLogger(__name__)

IDLE_NAP_S = 0.0005  # a step with nothing scheduled, loads in flight: pause this long (as our own engine does)


class ShadowServeConnector(KVConnectorBase_V1):
    """Prefix KV from a ShadowServe store, loaded asynchronously by our isolated data plane."""

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: Any = None) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        if vllm_config.parallel_config.tensor_parallel_size != 1 or vllm_config.parallel_config.pipeline_parallel_size != 1:
            raise ConfigError("ShadowServeConnector supports tensor/pipeline parallel size 1 for now")
        self.block_size = vllm_config.cache_config.block_size
        extra = self._kv_transfer_config.kv_connector_extra_config
        self.config: ConnectorConfig = parse_extra_config(extra, self.block_size)
        self.fingerprint = model_fingerprint(vllm_config, self.config.model_fingerprint)
        self.scheduler: SchedulerSide | None = None
        self.worker: WorkerSide | None = None
        self._deltas: CounterDelta | None = None  # for get_kv_connector_stats, once a side exists
        self._head_dim = vllm_config.model_config.get_head_size()
        if role == KVConnectorRole.SCHEDULER:
            self._init_scheduler(vllm_config)

    # ---- construction -------------------------------------------------------------------------

    def _init_scheduler(self, vllm_config: VllmConfig) -> None:
        kvt = vllm_config.kv_transfer_config
        if self.config.load_failure == "recompute" and kvt.kv_load_failure_policy != "recompute":
            # A failed fetch is a cache miss by design: vLLM must recompute, not fail the request.
            log.info("shadowserve: setting kv_load_failure_policy=recompute (load_failure in extra config)")
            kvt.kv_load_failure_policy = "recompute"
        # Lookups only: vLLM's own KV cache manager owns every block, and fetches run on the workers.
        manager = build_lookup_manager(self.config.dataplane, self.config.store_url if self.config.enabled else None,
                                       self.config.codec, self.fingerprint, NoBlocks(self.block_size))
        self.scheduler = SchedulerSide(self.config, self.block_size, manager)

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """Hand vLLM's KV buffer to our data plane (in shared memory for the offload process)."""
        if not self.config.enabled:
            return
        dp = self.config.dataplane
        if dp.dataplane_cores == "auto" and (free := auto_dataplane_cores()):
            dp = dataclasses.replace(dp, dataplane_cores=free)  # the cores vLLM's binding left to us
        kv_tensor = kv_tensor_view(kv_caches, self._head_dim)
        layers, _, kv_heads, _, _, head_dim = kv_tensor.shape
        handle = None
        if dp.fetch_mode == "offload":
            share(kv_tensor)
            handle = SharedTensorHandle.of(kv_tensor)
        _, plane_cores = dp.split_cores()
        target = KVTarget(kv_tensor, handle, layers, kv_heads, head_dim, kv_layout="head_major")
        manager = build_kv_manager(dp, self.config.store_url, self.config.codec, self.fingerprint, target,
                                   tuple(plane_cores), BlockLedger(self.block_size), lookups=False,
                                   wrap_backend=TrackedBackend)
        self.worker = WorkerSide(manager, self.block_size, dp.fetch_timeout)
        log.info("shadowserve: %s data plane on cores %s writing into vLLM's KV %s", dp.fetch_mode,
                 plane_cores, tuple(kv_tensor.shape))

    # ---- scheduler side -----------------------------------------------------------------------

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # a cache: a dropped save is a future miss, never a wrong answer

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        return self.scheduler.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: Request, blocks: Any, num_external_tokens: int) -> None:
        self.scheduler.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        return self.scheduler.build_connector_meta(scheduler_output)

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        return self.scheduler.request_finished(request, block_ids)

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        self.scheduler.update_connector_output(connector_output)

    def bind_kv_cache_manager(self, kv_cache_manager: Any) -> None:
        super().bind_kv_cache_manager(kv_cache_manager)
        if self.scheduler is not None:
            self.scheduler.kv_cache_manager = kv_cache_manager

    # ---- worker side --------------------------------------------------------------------------

    def _meta(self) -> ShadowServeMetadata | None:
        meta = self._connector_metadata
        return meta if isinstance(meta, ShadowServeMetadata) else None

    def handle_preemptions(self, kv_connector_metadata: KVConnectorMetadata) -> None:
        if self.worker is not None and isinstance(kv_connector_metadata, ShadowServeMetadata):
            self.worker.wait_for_preempted(kv_connector_metadata)

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        meta = self._meta()
        if self.worker is not None and meta is not None and meta.loads:
            self.worker.start_loads(meta.loads)

    def wait_for_layer_load(self, layer_name: str) -> None:
        """Loads are whole-request and asynchronous: a loading request is not in the batch."""

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        """Saves take whole chunks across all layers after the forward (``wait_for_save``)."""

    def wait_for_save(self) -> None:
        """Submit this step's saves and return: the data plane reads the blocks off the critical path."""
        meta = self._meta()
        if self.worker is not None and meta is not None and meta.saves:
            self.worker.start_saves(meta.saves)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        if self.worker is None:
            return None, None
        sending, recving = self.worker.take_finished(finished_req_ids)
        meta = self._meta()
        if meta is not None and meta.idle and self.worker.loading and not recving:
            # vLLM has nothing to run but steps again at once. A short sleep lets go of the GIL and
            # the engine core: thread-mode pipeline threads otherwise wait for GIL hand-offs
            # (TTFT 697 ms vs 51 with offload in docs/vllm.md), and every mode spins a core for nothing.
            self._idle_pause()
        return sending or None, recving or None

    def _idle_pause(self) -> None:
        time.sleep(IDLE_NAP_S)

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self.worker.take_errors() if self.worker is not None else set()

    def build_connector_worker_meta(self) -> ShadowServeWorkerMeta | None:
        """This step's number and the data plane's completions, for the scheduler side's estimates."""
        meta = self._meta()
        if self.worker is None or meta is None:
            return None
        completions, restarts = self.worker.take_feedback()
        return ShadowServeWorkerMeta([meta.step], completions, restarts, starting=not self.worker.backend.ready())

    # ---- both ---------------------------------------------------------------------------------

    def get_kv_connector_stats(self) -> ShadowServeStats | None:
        """What this half's counters gained since vLLM last asked (its "KV Transfer metrics" log line)."""
        side = self.scheduler or self.worker
        if side is None:
            return None
        if self._deltas is None:
            self._deltas = CounterDelta(side.manager)
        return self._deltas.take()

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> ShadowServeStats:
        return ShadowServeStats(data=dict(data or {}))

    @classmethod
    def build_prom_metrics(cls, vllm_config: VllmConfig, metric_types: dict, labelnames: list[str],
                           per_engine_labelvalues: dict[int, list[object]]) -> ShadowServePromMetrics:
        return ShadowServePromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    def stats(self) -> dict[str, Any]:
        """Hit and fetch counters of this instance's KVCacheManager (for tests, benches, logs)."""
        side = self.scheduler or self.worker
        return dict(vars(side.manager.stats)) if side is not None else {}

    def shutdown(self) -> None:
        for side in (self.scheduler, self.worker):
            if side is not None:
                side.close()
        self.scheduler = self.worker = None

