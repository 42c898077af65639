"""What an operator sees when the store is not there: a degraded /health, store_up 0, log lines,
and requests still answered; and a taken port refused before the model loads."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import httpx
import pytest

from shadowserve.server.launch import start_api_server
from shadowserve.store.launch import free_port, stop_pid
from tests.server.conftest import scrape


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def _log(server) -> str:
    with open(f"{server.workdir}/server.log") as f:
        return f.read()


@pytest.fixture
def store_port():
    return free_port()


@pytest.fixture
def server_without_store(store_port):
    server = start_api_server(
        "--model", "tiny-random", "--store", f"shadowserve://127.0.0.1:{store_port}", "--fetch-mode", "offload",
        "--kv-quality", "lossless", "--set", "dataplane.chunk_size=64", "--set", "dataplane.store_probe_interval=1",
    )
    yield server
    server.stop()


def test_unreachable_store_degrades_health_and_recovers(server_without_store, store_port):
    url = server_without_store.url
    _wait(lambda: httpx.get(f"{url}/health").json()["status"] == "degraded", 15, "a degraded /health")
    health = httpx.get(f"{url}/health")
    assert health.status_code == 200  # requests are still served, by recompute
    (reason,) = health.json()["reasons"]
    assert f"127.0.0.1:{store_port}" in reason and "unreachable" in reason
    assert scrape(url)["shadowserve_store_up"] == 0
    assert scrape(url)['shadowserve_store_errors_total{kind="unreachable"}'] >= 1
    prompt = "A document that cannot be fetched while its store is away. " * 8
    r = httpx.post(f"{url}/v1/completions", json={"prompt": prompt, "max_tokens": 3}, timeout=60)
    assert r.status_code == 200 and r.json()["shadowserve"]["fetched_tokens"] == 0
    log = _log(server_without_store)
    assert log.count("is unreachable") == 1, log[-3000:]  # one line per state change, not one per call
    assert "cores: engine pinned to cores" in log and "data plane on cores" in log
    assert "data plane started: process" in log

    store = subprocess.Popen([sys.executable, "-m", "shadowserve.commands.store", "serve", "--port", str(store_port)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait(lambda: httpx.get(f"{url}/health").json()["status"] == "ok", 20, "/health to recover")
        assert scrape(url)["shadowserve_store_up"] == 1
        assert "is reachable again" in _log(server_without_store)
    finally:
        stop_pid(store)


def test_port_in_use_is_refused_before_the_model_loads(tmp_path):
    missing_model = str(tmp_path / "no-such-model.gguf")  # loading it first would fail with a model error
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "shadowserve.cli", "serve", "--model", missing_model,
                               "--port", str(port)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert f"127.0.0.1:{port} is already in use" in proc.stderr, proc.stderr
    assert "serving" not in proc.stdout
