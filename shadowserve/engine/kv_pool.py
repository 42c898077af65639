"""Paged KV memory: one tensor of fixed-size blocks, optionally in named shared memory.

Layout ``[layers, 2 (K,V), num_blocks, block_size, kv_heads, head_dim]``: each layer's K (or V)
is one contiguous run of blocks, which is what attention gathers and what the data plane
scatters a fetched chunk into. In shared memory, another process attaches by name and writes
KV straight into the destination blocks with no copy through the engine. On CUDA the pool is
shared by CUDA IPC instead: the data-plane process maps the very same device allocation. The
handles that cross to that process live with the data plane (dataplane/shared_pool.py).
"""

from __future__ import annotations

import torch

from shadowserve.dataplane.shared_pool import DTYPES, CudaKVPoolHandle, KVPoolHandle
from shadowserve.dataplane.shm import Segment
from shadowserve.errors import ConfigError
from shadowserve.model.arch import ModelArch


def pool_shape(arch: ModelArch, num_blocks: int, block_size: int) -> tuple[int, ...]:
    return (arch.num_hidden_layers, 2, num_blocks, block_size, arch.num_key_value_heads, arch.head_dim)


def bytes_per_block(arch: ModelArch, block_size: int, dtype: torch.dtype) -> int:
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * arch.num_hidden_layers * block_size * arch.num_key_value_heads * arch.head_dim * elem


class KVPool:
    """Owns the KV tensor (and its shared-memory segment when shared)."""

    def __init__(
        self,
        arch: ModelArch,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: str = "cpu",
        shared: bool = False,
    ) -> None:
        if num_blocks < 1:
            raise ConfigError("the KV pool needs at least one block: raise kv_cache_memory")
        self.shape = pool_shape(arch, num_blocks, block_size)
        self.num_blocks, self.block_size, self.dtype = num_blocks, block_size, dtype
        self._shm: Segment | None = None
        self.shared = shared
        if shared and device == "cpu":
            numel = 1
            for d in self.shape:
                numel *= d
            nbytes = numel * torch.empty((), dtype=dtype).element_size()
            self._shm = Segment.create("kv-pool", nbytes)  # unlinked by close() or at interpreter exit
            self.tensor = torch.frombuffer(self._shm.buf, dtype=dtype, count=numel).view(self.shape)
            self.tensor.zero_()
        else:
            self.tensor = torch.zeros(self.shape, dtype=dtype, device=device)

    @property
    def nbytes(self) -> int:
        return self.tensor.numel() * self.tensor.element_size()

    def handle(self) -> KVPoolHandle | CudaKVPoolHandle:
        """What a data-plane process needs to write into this pool (shared memory or CUDA IPC)."""
        if self.tensor.device.type == "cuda":
            return CudaKVPoolHandle.of(self.tensor)
        if self._shm is None:
            raise ConfigError("this KV pool is not in shared memory (set shared_kv_pool)")
        name = next(k for k, v in DTYPES.items() if v == self.dtype)
        return KVPoolHandle(self._shm.name, self.shape, name)

    def close(self) -> None:
        """Release the tensor and, if shared, unlink the segment (the engine owns it)."""
        on_gpu = self.tensor is not None and self.tensor.device.type == "cuda"
        self.tensor = None  # drop the exported buffer before closing the mapping
        if on_gpu and self.shared:
            torch.cuda.ipc_collect()  # free it now if every data plane has let go of it
        if self._shm is not None:
            self._shm.close()
            self._shm = None
