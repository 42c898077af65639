"""Restarting the isolated data plane must not leave anything of the old process behind in the engine."""

from __future__ import annotations

import os
import threading

from shadowserve.config import CodecConfig, DataPlaneConfig, EngineConfig
from shadowserve.llm import create_engine


def test_restarts_keep_descriptors_and_threads_flat(tiny, tmp_path):
    """Each restart used to leave the old command pipe open and its sender thread blocked forever
    (found by ``bench soak``: one descriptor and one thread more per killed data plane)."""
    cfg = DataPlaneConfig(fetch_mode="offload", chunk_size=32, heartbeat_interval=0.2, heartbeat_timeout=3.0)
    eng = create_engine(EngineConfig(model="tiny-random", kv_cache_memory="16MiB"), loaded=tiny, dataplane=cfg,
                        store_url=f"file://{tmp_path}/store", codec=CodecConfig(quant="none"))
    try:
        backend = eng.kv_manager.backend
        backend.restart()  # anything a first restart sets up once is in place before counting
        fds, threads = len(os.listdir("/proc/self/fd")), threading.active_count()
        pids = {backend.process.pid}
        for _ in range(3):
            backend.restart()
            pids.add(backend.process.pid)
        assert len(pids) == 4 and backend.healthy()
        assert threading.active_count() == threads
        assert len(os.listdir("/proc/self/fd")) == fds
    finally:
        eng.close()
