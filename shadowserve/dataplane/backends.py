"""The data-plane backends (one per fetch mode) behind one declared interface: where the pipeline runs.

- ``sync``: inside the engine step (the engine waits for the pipeline: CacheGen-Sync).
- ``thread``: on background threads of the engine process, pinned to the data-plane cores.
- ``offload``: in the isolated data-plane process on its reserved cores (ShadowServe).
- ``gpu``: like ``thread``, but dequantization runs on the serving GPU (CacheGen-Async; CUDA only).
- ``recompute`` has no backend at all (the engine's port is ``NoRemoteKV``).

Like vLLM's kv_offload split between a manager and workers, every ``FetchBackend`` method is called
by the control plane in the engine's process; the pipeline behind it runs on that process's threads
or in the data-plane process, and reports back only through ``poll``.
"""

from __future__ import annotations

import abc
import dataclasses
import logging
import os
import threading
from collections import deque

from shadowserve.dataplane.buffers import SlotPool
from shadowserve.dataplane.messages import Completion, FetchCommand, SaveCommand
from shadowserve.dataplane.pipeline import BufferLayout
from shadowserve.dataplane.process import DataPlaneProcess
from shadowserve.dataplane.shared_pool import CudaKVPoolHandle
from shadowserve.dataplane.spec import DataPlaneSpec, build_pipeline
from shadowserve.errors import ConfigError, FetchError

log = logging.getLogger("shadowserve.dataplane")


class FetchBackend(abc.ABC):
    """What the control plane talks to (every method runs in the engine's process, never blocking
    on the store except ``submit`` of a ``synchronous`` backend); completions come back by ``poll``."""

    synchronous = False  # True: ``submit`` returns only when the job is done (the engine step waits)

    @abc.abstractmethod
    def submit(self, cmd: FetchCommand | SaveCommand) -> None:
        """Queue a fetch (write chunks into the given blocks) or a save (read them); its Completion
        comes from a later ``poll``. The blocks must not be reused until then (the caller holds them)."""

    @abc.abstractmethod
    def poll(self) -> list[Completion]:
        """Completions since the last call, without waiting."""

    def healthy(self) -> bool:
        """False when the pipeline died or stopped beating: the caller fails over with ``restart``."""
        return True

    def ready(self) -> bool:
        """False while a restarted pipeline is still starting: the caller computes rather than wait."""
        return True

    @abc.abstractmethod
    def restart(self) -> None:
        """Make sure no previously submitted job can still write, without waiting for the new pipeline
        (``ready`` says when it can take work); fail-over is the caller's job."""

    def stats(self) -> dict:
        """The pipeline's counters (stage busy seconds, buffer occupancy); {} before the first report."""
        return {}

    def describe(self) -> str:
        """Where the pipeline runs, for the operator's log lines."""
        return f"{self.spec.config.fetch_mode} pipeline on cores {list(self.spec.cores) or 'any'}"

    def down_reason(self) -> str:
        """Why ``healthy()`` is False, for the log line that reports it."""
        return "not healthy"

    @abc.abstractmethod
    def close(self) -> None:
        """Stop the pipeline; afterwards nothing it ran can touch the KV memory."""


class LookupOnlyBackend(FetchBackend):
    """No data plane at all: for a control plane that only answers lookups (vLLM's scheduler process)."""

    def describe(self) -> str:
        return "no pipeline (lookups only)"

    def submit(self, cmd: FetchCommand | SaveCommand) -> None:
        raise FetchError("this control plane only answers lookups: fetches and saves run elsewhere")

    def poll(self) -> list[Completion]:
        return []

    def restart(self) -> None:
        pass  # nothing runs, so nothing can still write

    def close(self) -> None:
        pass


class ThreadBackend(FetchBackend):
    """The pipeline on threads of this process (optionally pinned to the data-plane cores)."""

    def __init__(self, spec: DataPlaneSpec, kv_tensor) -> None:
        self.spec, self._kv = spec, kv_tensor
        self._done: deque[Completion] = deque()
        self._pipeline = build_pipeline(spec, kv_tensor, on_thread_start=self._pin)

    def _pin(self) -> None:
        if self.spec.cores:
            os.sched_setaffinity(0, self.spec.cores)  # pid 0: this thread only, on Linux

    @property
    def pipeline(self):
        """The pipeline in this process (its local tier included), for inspection."""
        return self._pipeline

    def submit(self, cmd: FetchCommand | SaveCommand) -> None:
        self._pipeline.submit(cmd, self._done.append)

    def poll(self) -> list[Completion]:
        out = []
        while self._done:
            out.append(self._done.popleft())
        return out

    def restart(self) -> None:
        # Threads cannot be killed: close (which waits for stage threads) and rebuild.
        self._pipeline.close()
        self._pipeline = build_pipeline(self.spec, self._kv, on_thread_start=self._pin)

    def stats(self) -> dict:
        return self._pipeline.stats()

    def close(self) -> None:
        self._pipeline.close()
        self._kv = None  # the engine's pool must not outlive the engine through us


class SyncBackend(ThreadBackend):
    """The same pipeline, but ``submit`` returns only when the job is done: the step waits."""

    synchronous = True

    def submit(self, cmd: FetchCommand | SaveCommand) -> None:
        finished = threading.Event()

        def done(c: Completion) -> None:
            self._done.append(c)
            finished.set()

        self._pipeline.submit(cmd, done)
        finished.wait()


class OffloadBackend(FetchBackend):
    """The pipeline in the isolated data-plane process; the engine owns the shared buffers."""

    def __init__(self, spec: DataPlaneSpec) -> None:
        cfg = spec.config
        lay = spec.layout
        # Created (and first-touched) once here; restarts of the process reuse them. A GPU pool is
        # fed from pinned kv slots that the data-plane process makes itself (page-locking is per process).
        self._segments = [
            SlotPool("receive", cfg.receive_slots, lay.receive_bytes),
            SlotPool("staging", cfg.staging_slots, lay.staging_bytes),
        ]
        if not isinstance(spec.pool_handle, CudaKVPoolHandle):
            self._segments.append(SlotPool("kv", cfg.kv_slots, lay.kv_bytes))
        names = [s.shm_name for s in self._segments] + [None] * (3 - len(self._segments))
        lay = BufferLayout(lay.receive_bytes, lay.staging_bytes, lay.kv_bytes, *names)
        self.spec = dataclasses.replace(spec, layout=lay)
        try:
            self.process = DataPlaneProcess(self.spec)
        except BaseException:
            for seg in self._segments:
                seg.close()
            raise
        log.info("data plane started: %s", self.describe())

    def submit(self, cmd: FetchCommand | SaveCommand) -> None:
        self.process.submit(cmd)

    def poll(self) -> list[Completion]:
        return self.process.poll()

    def healthy(self) -> bool:
        return self.process.healthy()

    def ready(self) -> bool:
        return self.process.ready()

    def restart(self) -> None:
        self.process.restart()

    def stats(self) -> dict:
        return self.process.last_stats

    def describe(self) -> str:
        return f"process {self.process.pid} on cores {list(self.spec.cores) or 'any'}"

    def down_reason(self) -> str:
        return self.process.down_reason()

    def close(self) -> None:
        self.process.close()
        for s in self._segments:
            s.close()


def create_backend(spec: DataPlaneSpec, kv_tensor) -> FetchBackend:
    """The backend of ``spec.config.fetch_mode`` over ``kv_tensor`` (offload reaches it via ``spec.pool_handle``)."""
    mode = spec.config.fetch_mode
    if mode == "sync":
        return SyncBackend(spec, kv_tensor)
    if mode == "thread":
        return ThreadBackend(spec, kv_tensor)
    if mode == "offload":
        return OffloadBackend(spec)
    if mode == "gpu":
        if getattr(kv_tensor, "device", None) is None or kv_tensor.device.type != "cuda":
            raise ConfigError("the gpu fetch mode decodes on the serving GPU: it needs --device cuda")
        return ThreadBackend(spec, kv_tensor)  # the pipeline sees fetch_mode "gpu" and decodes on the device
    raise ConfigError(f"fetch mode {mode!r} has no data plane")
