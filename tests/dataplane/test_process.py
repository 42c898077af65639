"""The data-plane process as its own interpreter: handles cross to it, and it dies with the engine."""

from __future__ import annotations

import dataclasses
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import shadowserve
from shadowserve.config import CodecConfig, DataPlaneConfig, EngineConfig
from shadowserve.dataplane.pipeline import BufferLayout
from shadowserve.dataplane.process import DataPlaneProcess
from shadowserve.dataplane.shared_pool import KVPoolHandle, SharedTensorHandle
from shadowserve.dataplane.shm import PREFIX, SHM_DIR
from shadowserve.dataplane.spec import DataPlaneSpec
from shadowserve.errors import FetchError
from shadowserve.llm import create_engine

ENV = dict(os.environ, PYTHONPATH=str(Path(shadowserve.__file__).resolve().parents[1]))


def _gone(pid: int) -> bool:
    """Exited (a zombie nobody has reaped yet counts as exited)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_a_shared_tensor_crosses_to_another_interpreter_by_its_descriptor():
    """vLLM's KV buffer: a strided view into fd-backed shared memory, written by a plain subprocess."""
    base = torch.zeros((4, 6), dtype=torch.float32)
    view = base[1:3, ::2]  # storage offset 6, strides (6, 2)
    handle = SharedTensorHandle.of(view)
    assert base.is_shared() and handle.offset == 6 and handle.stride == (6, 2)
    code = ("import pickle, sys, torch\n"
            "pool = pickle.load(sys.stdin.buffer).attach()\n"
            "pool.tensor.copy_(torch.arange(1, 7, dtype=torch.float32).view(2, 3))\n"
            "pool.close()\n")
    done = subprocess.run([sys.executable, "-c", code], input=pickle.dumps(handle), env=ENV,
                          pass_fds=handle.inherited_fds(), capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr.decode()
    want = torch.zeros((4, 6))
    want[1:3, ::2] = torch.arange(1, 7, dtype=torch.float32).view(2, 3)
    assert torch.equal(base, want)  # the child wrote exactly the view's elements, into our memory


def test_the_data_plane_dies_with_a_killed_engine(tmp_path):
    script = tmp_path / "engine.py"
    script.write_text(
        "import time\n"
        "from shadowserve import LLM\n"
        f"llm = LLM('tiny-random', store='file://{tmp_path}/store', fetch_mode='offload', progress=False)\n"
        "print(llm.engine.kv_manager.backend.process.pid, flush=True)\n"
        "time.sleep(120)\n")
    engine = subprocess.Popen([sys.executable, str(script)], env=ENV, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True)
    try:
        plane = int(engine.stdout.readline())
        assert not _gone(plane)
        assert any(n.startswith(f"{PREFIX}{engine.pid}_") for n in os.listdir(SHM_DIR))
    finally:
        os.kill(engine.pid, signal.SIGKILL)
        engine.wait()
    deadline = time.monotonic() + 20
    while not _gone(plane) or any(n.startswith(f"{PREFIX}{engine.pid}_") for n in os.listdir(SHM_DIR)):
        assert time.monotonic() < deadline, "the data plane or the engine's shared memory outlived the engine"
        time.sleep(0.1)


def test_a_data_plane_that_cannot_attach_reports_why(tmp_path):
    spec = DataPlaneSpec(DataPlaneConfig(), f"file://{tmp_path}/store", CodecConfig(), "fp",
                         KVPoolHandle(f"{PREFIX}no_such_segment", (4,), "float32"), BufferLayout(64, 64, 64), ())
    with pytest.raises(FetchError, match="failed to start: FetchError: shared memory segment .* is gone"):
        DataPlaneProcess(spec, start_timeout=60)


def test_a_restart_that_cannot_start_is_reported_not_raised(tiny, tmp_path):
    """A restart returns at once; a new process that then fails to start makes the plane unhealthy with
    the reason (the caller fails over again), instead of raising out of the engine's step."""
    cfg = DataPlaneConfig(fetch_mode="offload", chunk_size=32, heartbeat_interval=0.2, heartbeat_timeout=3.0)
    eng = create_engine(EngineConfig(model="tiny-random", kv_cache_memory="16MiB"), loaded=tiny, dataplane=cfg,
                        store_url=f"file://{tmp_path}/store", codec=CodecConfig(quant="none"))
    try:
        process = eng.kv_manager.backend.process
        good = process.spec
        process.spec = dataclasses.replace(good, pool_handle=KVPoolHandle(f"{PREFIX}no_such_segment", (4,), "float32"))
        process.restart()
        assert not process.ready() and process.healthy()  # starting, within its start timeout
        deadline = time.monotonic() + 60
        while process.healthy():
            assert time.monotonic() < deadline, "the failed start was never noticed"
            time.sleep(0.05)
        assert not process.ready()
        assert re.search(r"process \d+ failed to start: FetchError: shared memory segment .* is gone",
                         process.down_reason()), process.down_reason()
        process.spec = good
        process.restart()
        while not process.ready():
            assert time.monotonic() < deadline, "the second restart never became ready"
            time.sleep(0.05)
        assert process.healthy()
    finally:
        eng.close()
