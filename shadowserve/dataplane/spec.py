"""What a data plane is built from, wherever it runs: its spec, its slot sizes, and its pipeline.

Every backend (dataplane/backends.py) builds its pipeline with ``build_pipeline`` from a
``DataPlaneSpec``, in the engine's process (sync, thread, gpu) or in the isolated data-plane
process (offload, dataplane/process.py), so the modes differ only in where the same code runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from shadowserve.config import CodecConfig, DataPlaneConfig
from shadowserve.dataplane.local_tier import LocalTier, page_size_for
from shadowserve.dataplane.pipeline import BufferLayout, Pipeline
from shadowserve.dataplane.shared_pool import PoolHandle
from shadowserve.kvcache.codec import KVCodec
from shadowserve.store import open_store
from shadowserve.values import parse_size

# Room for the container header and incompressible data on top of the raw chunk size.
_HEADER_SLACK = 64 * 1024


def buffer_layout(chunk_shape: tuple[int, ...], element_size: int, codec=None) -> BufferLayout:
    """Slot sizes for one chunk: an encoded chunk never exceeds raw size plus header slack."""
    raw = int(np.prod(chunk_shape)) * element_size
    receive = staging = raw + _HEADER_SLACK
    if codec is not None:
        receive = max(receive, int(codec.max_encoded_nbytes(chunk_shape)))
        staging = max(staging, int(codec.max_staging_nbytes(chunk_shape)))
    return BufferLayout(receive_bytes=receive, staging_bytes=staging, kv_bytes=raw)


@dataclass(frozen=True)
class DataPlaneSpec:
    """Everything a data-plane process needs to build its pipeline (picklable)."""

    config: DataPlaneConfig
    store_url: str
    codec_config: CodecConfig
    fingerprint: str
    pool_handle: PoolHandle | None  # what the offload process attaches to (None: the pipeline runs in this process)
    layout: BufferLayout
    cores: tuple[int, ...]
    kv_layout: str = "engine"  # how the pool pages KV (dataplane/kv_targets.py)


def build_pipeline(spec: DataPlaneSpec, kv_tensor, on_thread_start: Callable[[], None] | None = None) -> Pipeline:
    """The pipeline over ``kv_tensor``, with its own store connection, codec and local tier (in the
    calling process: the tier lives and dies with the process that runs the pipeline)."""
    store = open_store(spec.store_url)
    codec = KVCodec(spec.codec_config, spec.fingerprint)
    return Pipeline(spec.config, store, codec, kv_tensor, spec.layout, on_thread_start, spec.kv_layout,
                    tier=local_tier(spec.config, spec.layout))


def local_tier(config: DataPlaneConfig, layout: BufferLayout) -> LocalTier | None:
    """The configured tier, its pages sized from the raw chunk (None when ``local_tier`` is 0)."""
    capacity = parse_size(config.local_tier)
    if capacity == 0:
        return None
    return LocalTier(capacity, page_size_for(layout.kv_bytes), config.local_tier_admission)
