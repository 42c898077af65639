"""The one wiring of the KV plane: codec -> chunk keys -> buffer layout -> data-plane spec -> backend -> manager.

Our engine (``engine_kv_manager``) and the vLLM connector (integrations/vllm/connector.py) both call
``build_kv_manager``; they differ only in the KV memory they hand over (our KV pool or vLLM's
buffer) and in who owns the blocks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from shadowserve.config import CodecConfig, DataPlaneConfig
from shadowserve.controlplane.manager import KVCacheManager
from shadowserve.controlplane.ports import BlockHolder, KeyFn
from shadowserve.dataplane.backends import FetchBackend, LookupOnlyBackend, create_backend
from shadowserve.dataplane.spec import DataPlaneSpec, buffer_layout
from shadowserve.engine.remote_kv import KVHost
from shadowserve.errors import ConfigError
from shadowserve.kvcache.chunking import chunk_keys, key_seed
from shadowserve.kvcache.codec import KVCodec, kv_format_id_of
from shadowserve.store import open_store


@dataclass(frozen=True)
class KVTarget:
    """The paged KV memory the data plane writes into, and how an isolated data plane reaches it."""

    tensor: torch.Tensor
    handle: object | None  # what the offload process attaches to (None: the pipeline runs in this process)
    num_layers: int
    num_kv_heads: int
    head_dim: int
    kv_layout: str = "engine"  # how the memory pages KV (dataplane/kv_targets.py)

    def chunk_shape(self, chunk_size: int) -> tuple[int, ...]:
        """One stored chunk: ``[layers, 2 (K,V), tokens, kv_heads, head_dim]``."""
        return (self.num_layers, 2, chunk_size, self.num_kv_heads, self.head_dim)


def chunk_key_fn(fingerprint: str, codec_config: CodecConfig, chunk_size: int) -> KeyFn:
    """The chained keys of a prompt's full chunks, seeded by model, KV format and the request's salt."""
    format_id = kv_format_id_of(codec_config)
    unsalted = key_seed(fingerprint, format_id)

    def keys(ids: Sequence[int], cache_salt: str | None = None) -> list[bytes]:
        seed = unsalted if cache_salt is None else key_seed(fingerprint, format_id, cache_salt)
        return chunk_keys(list(ids), chunk_size, seed)

    return keys


def build_kv_manager(
    config: DataPlaneConfig,
    store_url: str,
    codec_config: CodecConfig,
    fingerprint: str,
    target: KVTarget,
    cores: tuple[int, ...],
    blocks: BlockHolder,
    lookups: bool = True,
    wrap_backend: Callable[[FetchBackend], FetchBackend] | None = None,
) -> KVCacheManager:
    """A control plane over a fresh data plane writing into ``target`` on ``cores``.

    ``lookups=False`` leaves prefix lookups to another manager (vLLM's scheduler process);
    ``wrap_backend`` lets the caller watch the backend (the vLLM worker counts saves in flight).
    """
    codec = KVCodec(codec_config, fingerprint)
    key_fn = chunk_key_fn(fingerprint, codec_config, config.chunk_size)
    layout = buffer_layout(target.chunk_shape(config.chunk_size), target.tensor.element_size(), codec)
    spec = DataPlaneSpec(config, store_url, codec_config, fingerprint, target.handle, layout, cores,
                         kv_layout=target.kv_layout)
    lookup_store = open_store(store_url) if lookups else None
    backend = create_backend(spec, target.tensor)
    if wrap_backend is not None:
        backend = wrap_backend(backend)
    return KVCacheManager(config, blocks, backend, lookup_store, key_fn, store_url)


def build_lookup_manager(
    config: DataPlaneConfig, store_url: str | None, codec_config: CodecConfig, fingerprint: str, blocks: BlockHolder
) -> KVCacheManager:
    """A control plane that only answers prefix lookups (no data plane: fetches run elsewhere)."""
    store = open_store(store_url) if store_url is not None else None
    key_fn = chunk_key_fn(fingerprint, codec_config, config.chunk_size)
    return KVCacheManager(config, blocks, LookupOnlyBackend(), store, key_fn, store_url or "")


def engine_kv_manager(
    config: DataPlaneConfig, store_url: str, codec_config: CodecConfig, host: KVHost
) -> KVCacheManager:
    """The remote KV cache of our own engine: its pool, its block manager, its data-plane cores."""
    if config.fetch_mode == "offload" and store_url.startswith("memory:"):
        raise ConfigError("a memory:// store lives inside this process, where the offload data plane "
                          "cannot see it: use file:///dir, shadowserve://host:port or redis://")
    if config.chunk_size % host.block_size:
        raise ConfigError(f"chunk_size {config.chunk_size} must be a multiple of block_size {host.block_size}")
    arch = host.arch
    handle = host.kv_pool.handle() if config.fetch_mode == "offload" else None
    target = KVTarget(host.kv_pool.tensor, handle, arch.num_hidden_layers, arch.num_key_value_heads, arch.head_dim)
    cores = host.engine_cores if config.pipeline_on_engine_cores() else host.dataplane_cores
    return build_kv_manager(config, store_url, codec_config, host.fingerprint, target, cores, host.block_manager)
