"""vLLM's per-layer KV tensors as the one KV tensor our data plane writes into.

On the CPU, vLLM (LBHNC layout) allocates every layer's KV in one buffer, layer after layer; each
layer is ``[num_blocks, kv_heads, block_size, 2 * head_size]`` whose rows hold a block's keys then
its values per head. So the whole cache is a single ``[layers, blocks, kv_heads, 2, block_size,
head_dim]`` tensor (the ``head_major`` layout of dataplane/kv_targets.py) over the same memory.

For the offload data plane the buffer moves into shared memory in place (``share_memory_`` swaps
the storage's pages under every view vLLM holds, after one copy at start-up), and a
``SharedTensorHandle`` (dataplane/shared_pool.py) hands its file descriptor to the data-plane
process, which inherits it when it starts.
"""

from __future__ import annotations

import torch

from shadowserve.errors import ConfigError


def kv_tensor_view(kv_caches: dict[str, torch.Tensor], head_dim: int) -> torch.Tensor:
    """One ``[layers, blocks, kv_heads, 2, block_size, head_dim]`` view over vLLM's KV buffer."""
    tensors = list(kv_caches.values())
    if not tensors:
        raise ConfigError("vLLM registered no KV cache tensors")
    first = tensors[0]
    if first.device.type != "cpu":
        raise ConfigError(f"the vLLM connector handles CPU KV caches for now, got {first.device}")
    if first.dim() != 4 or first.shape[-1] != 2 * head_dim or not first.is_contiguous():
        raise ConfigError(f"unexpected vLLM KV cache shape {tuple(first.shape)}: expected the CPU backend's "
                          f"[blocks, kv_heads, block_size, 2*{head_dim}]")
    num_blocks, kv_heads, block_size, _ = first.shape
    layer_bytes = first.numel() * first.element_size()
    for i, t in enumerate(tensors):
        same = t.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
        if (not same or t.shape != first.shape or t.dtype != first.dtype
                or t.data_ptr() != first.data_ptr() + i * layer_bytes):
            raise ConfigError("vLLM's KV layers are not one buffer laid out layer after layer (LBHNC): "
                              "this KV cache layout is not supported by the connector")
    shape = (len(tensors), num_blocks, kv_heads, 2, block_size, head_dim)
    view = torch.empty(0, dtype=first.dtype)
    view.set_(first.untyped_storage(), first.storage_offset(), shape)
    return view


def share(kv_tensor: torch.Tensor) -> None:
    """Move the KV tensor's storage into shared memory in place (every existing view follows)."""
    kv_tensor.untyped_storage().share_memory_()
