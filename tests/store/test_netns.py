"""A real shaped link in network namespaces (skips where namespaces are not permitted)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from shadowserve.store.netns import SERVER_ADDR, ShapedLink, netns_available

ok, why = netns_available()
pytestmark = pytest.mark.skipif(not ok, reason=f"network namespace helper unavailable: {why}")

_CLIENT = r"""
import sys, time
from shadowserve.store import open_store
store = open_store(sys.argv[1])
for _ in range(100):
    try:
        store.put(b"k" * 16, b"n" * (4 << 20)); break
    except Exception:
        time.sleep(0.05)
buf = bytearray(4 << 20)
store.get_into(b"k" * 16, buf)
start = time.monotonic()
for _ in range(int(sys.argv[2])):
    store.get_into(b"k" * 16, buf)
print((time.monotonic() - start))
"""


def _namespaces() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


def test_tbf_link_between_namespaces_and_cleanup():
    with ShapedLink("400mbit") as link:
        names = (link.server_ns, link.client_ns)
        assert all(n in _namespaces() for n in names)
        link.popen_server([sys.executable, "-m", "shadowserve.cli", "store", "serve", "--host", SERVER_ADDR,
                           "--port", "7480"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        reads = 6  # 24 MiB over 50 MB/s: ~0.5 s
        out = link.run_client([sys.executable, "-c", _CLIENT, f"shadowserve://{SERVER_ADDR}:7480", str(reads)],
                              capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        rate = reads * (4 << 20) / float(out.stdout.strip().splitlines()[-1])
        assert 0.85 < rate / 50e6 < 1.08, rate
    assert not any(n in _namespaces() for n in names)
