"""Sharing the engine's KV memory with the data-plane process: the handles and their attached views.

The engine (or vLLM's worker) owns the KV memory; a handle is the picklable description of it that
crosses to the data-plane process when it starts (plain data over a pipe: that process is its own
interpreter, not a multiprocessing child), and ``attach()`` (run in that process) maps the very same
memory, so fetched KV lands in the destination blocks with no copy through the engine:
- ``KVPoolHandle``: a pool in named shared memory (our CPU engine),
- ``CudaKVPoolHandle``: a device pool shared by CUDA IPC (our GPU engine),
- ``SharedTensorHandle``: a CPU tensor already moved into fd-backed shared memory (vLLM's KV buffer);
  the data-plane process inherits the descriptor (``inherited_fds``).
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass
from typing import Protocol

import torch
from torch.multiprocessing.reductions import reduce_tensor

from shadowserve.dataplane.shm import Segment
from shadowserve.errors import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class AttachedPool(Protocol):
    """The data plane's view of the engine's KV memory (same memory, no copy)."""

    tensor: torch.Tensor | None

    def close(self) -> None:
        """Drop the mapping (the owner frees the memory, never the data plane)."""


class PoolHandle(Protocol):
    """Picklable: crosses to the data-plane process, where ``attach`` maps the memory."""

    def attach(self) -> AttachedPool:
        """Runs in the data-plane process, once per start."""

    def inherited_fds(self) -> tuple[int, ...]:
        """Descriptors the data-plane process must inherit (same numbers) for ``attach`` to work."""


@dataclass(frozen=True)
class KVPoolHandle:
    """Picklable description of a shared pool; enough for another process to attach to it."""

    shm_name: str
    shape: tuple[int, ...]
    dtype: str

    def attach(self) -> AttachedKVPool:
        """Map the pool in this (data-plane) process."""
        return AttachedKVPool(self)

    def inherited_fds(self) -> tuple[int, ...]:
        return ()


@dataclass(frozen=True)
class CudaKVPoolHandle:
    """A CUDA pool shared by IPC: torch's CUDA-tensor reduction (an IPC handle of the device
    allocation plus a shared reference count), kept as plain data until ``attach`` maps it.

    Only the attached pool holds the mapped tensor, so a data plane that shuts down cleanly drops
    its reference and the engine can reclaim the memory when it closes (``torch.cuda.ipc_collect``).
    A data plane that is killed never drops it: that pool stays allocated until the engine's
    process exits (torch keeps a block whose consumers have not released it).
    """

    rebuild: object
    args: tuple

    @classmethod
    def of(cls, tensor: torch.Tensor) -> CudaKVPoolHandle:
        rebuild, args = reduce_tensor(tensor)
        return cls(rebuild, args)

    def attach(self) -> AttachedCudaKVPool:
        return AttachedCudaKVPool(self.rebuild(*self.args))

    def inherited_fds(self) -> tuple[int, ...]:
        return ()  # the IPC handle and the ref-count file are named, not descriptors


class AttachedCudaKVPool:
    """The data plane's mapping of the engine's device pool (same memory, no copy)."""

    def __init__(self, tensor: torch.Tensor) -> None:
        if tensor.device.type != "cuda":
            raise ConfigError("a CUDA KV pool handle must carry a CUDA tensor")
        self.tensor = tensor

    def close(self) -> None:
        self.tensor = None


class AttachedKVPool:
    """Another process's view of a shared pool (the data plane writes through it)."""

    def __init__(self, handle: KVPoolHandle) -> None:
        self._shm = Segment.attach(handle.shm_name)
        numel = 1
        for d in handle.shape:
            numel *= d
        self.tensor = torch.frombuffer(self._shm.buf, dtype=DTYPES[handle.dtype], count=numel).view(handle.shape)
        # Map every page into this process now: otherwise the first chunk written into each block
        # pays a page fault on the hot path (measured: ~200 ms more TTFT for an 8K-token prefix).
        flat = torch.frombuffer(self._shm.buf, dtype=torch.uint8)
        int(flat[::4096].sum())
        del flat

    def close(self) -> None:
        self.tensor = None
        self._shm.close()


@dataclass(frozen=True)
class SharedTensorHandle:
    """A CPU tensor whose storage is in fd-backed shared memory (vLLM's KV buffer, after
    ``share_memory_``): the descriptor number plus the view's geometry.

    The data-plane process inherits the descriptor at the same number and maps it. torch's own
    pickling of such a tensor would instead go through multiprocessing's fd-sharing service, which
    only a multiprocessing child can reach.
    """

    fd: int
    nbytes: int
    dtype: str
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int  # in elements, like ``Tensor.storage_offset``

    @classmethod
    def of(cls, tensor: torch.Tensor) -> SharedTensorHandle:
        """Describe ``tensor`` (its storage moves into fd-backed shared memory if it is not there yet)."""
        if tensor.device.type != "cpu":
            raise ConfigError("a shared tensor handle describes a CPU tensor")
        name = next((k for k, v in DTYPES.items() if v == tensor.dtype), None)
        if name is None:
            raise ConfigError(f"unsupported KV dtype {tensor.dtype}")
        fd, nbytes = tensor.untyped_storage()._share_fd_cpu_()  # the storage keeps this fd open
        return cls(fd, nbytes, name, tuple(tensor.shape), tuple(tensor.stride()), tensor.storage_offset())

    def inherited_fds(self) -> tuple[int, ...]:
        return (self.fd,)

    def attach(self) -> AttachedSharedTensor:
        """Called in the data-plane process, which inherited ``fd``."""
        return AttachedSharedTensor(self)


class AttachedSharedTensor:
    """The data plane's mapping of a shared tensor (same pages as the owner's)."""

    def __init__(self, handle: SharedTensorHandle) -> None:
        self._mmap = mmap.mmap(handle.fd, handle.nbytes)
        flat = torch.frombuffer(self._mmap, dtype=DTYPES[handle.dtype])
        self.tensor = flat.as_strided(handle.shape, handle.stride, handle.offset)
        # Map every page now, not on the first chunk's hot path.
        int(torch.frombuffer(self._mmap, dtype=torch.uint8)[::4096].sum())

    def close(self) -> None:
        self.tensor = None
        self._mmap.close()
