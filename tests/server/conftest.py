"""Live API servers for the server tests: real ``shadowserve serve`` processes on free ports."""

from __future__ import annotations

import re
import urllib.request

import pytest

from shadowserve.server.launch import start_api_server

MAX_MODEL_LEN = 512


@pytest.fixture(scope="module")
def api_server():
    """tiny-random, no remote store, a small context and body limit so the limits are cheap to hit."""
    server = start_api_server(
        "--model", "tiny-random", "--max-model-len", str(MAX_MODEL_LEN),
        "--set", "server.max_request_size=64KiB", "--set", "engine.max_num_seqs=32",
    )
    yield server
    server.stop()


def scrape(base_url: str) -> dict[str, float]:
    """``/metrics`` as {series with labels: value} (comments and _created series dropped)."""
    with urllib.request.urlopen(f"{base_url}/metrics", timeout=5) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, value = line.rsplit(" ", 1)
        if not re.search(r"_created(\{|$)", name):
            out[name] = float(value)
    return out
