"""A real shaped link: two network namespaces joined by a veth pair, each end under ``tc tbf``.

For experiments that want the kernel's TCP to see a slow link (rather than the client-side
token bucket). Everything it makes is private to it: two namespaces with unique names, the
veth pair created directly inside them, and addresses only from 192.0.2.0/24 (TEST-NET-1) that
exist nowhere but inside those namespaces. Deleting the namespaces removes the veth pair too,
and ``close()`` runs on exit from the ``with`` block and at interpreter exit.
"""

from __future__ import annotations

import atexit
import itertools
import os
import shutil
import subprocess
from collections.abc import Sequence
from typing import Any

from shadowserve.errors import StoreError
from shadowserve.store.launch import stop_pid
from shadowserve.values import parse_rate

SERVER_ADDR = "192.0.2.1"
CLIENT_ADDR = "192.0.2.2"
_counter = itertools.count()


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
    if check and proc.returncode != 0:
        raise StoreError(f"ip {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc


def netns_available() -> tuple[bool, str]:
    """Whether this process may create namespaces and tbf qdiscs; the reason when it may not."""
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return False, f"'{tool}' (iproute2) is not installed"
    if os.geteuid() != 0:
        return False, "creating network namespaces needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN)"
    try:
        with ShapedLink("1gbit"):
            pass
    except StoreError as exc:
        return False, f"network namespaces are not permitted here: {exc}"
    return True, ""


class ShapedLink:
    """``with ShapedLink("1gbit") as link:`` then ``link.popen_server([...])`` / ``link.run_client([...])``.

    The server side is ``SERVER_ADDR`` in ``link.server_ns``; the client side ``CLIENT_ADDR`` in
    ``link.client_ns``. Both directions are shaped to ``rate`` by ``tbf`` on the sending end.
    """

    def __init__(self, rate: str, burst: int | None = None) -> None:
        self.rate_text = rate
        self.rate = parse_rate(rate)  # bytes/s
        # tbf needs burst >= rate / HZ; ~4 ms of traffic covers HZ=250 and keeps bursts short.
        self.burst = int(burst or max(64 << 10, self.rate * 0.004))
        tag = f"ss{os.getpid()}x{next(_counter)}"
        self.server_ns, self.client_ns = f"{tag}s", f"{tag}c"
        self._made: list[str] = []
        self._procs: list[subprocess.Popen] = []

    def __enter__(self) -> ShapedLink:
        try:
            self._setup()
        except BaseException:
            self.close()
            raise
        atexit.register(self.close)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _setup(self) -> None:
        for ns in (self.server_ns, self.client_ns):
            _ip("netns", "add", ns)
            self._made.append(ns)
        _ip("link", "add", "ssv0", "netns", self.server_ns, "type", "veth", "peer", "name", "ssv1",
            "netns", self.client_ns)
        rate_bits = f"{int(self.rate * 8)}bit"
        for ns, dev, addr in ((self.server_ns, "ssv0", SERVER_ADDR), (self.client_ns, "ssv1", CLIENT_ADDR)):
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            tc = subprocess.run(
                ["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate_bits,
                 "burst", str(self.burst), "latency", "50ms"],
                capture_output=True, text=True, timeout=10,
            )
            if tc.returncode != 0:
                raise StoreError(f"tc tbf on {dev} failed: {tc.stderr.strip()}")

    def exec_prefix(self, ns: str) -> list[str]:
        """Command prefix that runs a program inside namespace ``ns``."""
        return ["ip", "netns", "exec", ns]

    def popen_server(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen:
        """Start a long-running process in the server namespace; stopped by PID on close()."""
        proc = subprocess.Popen([*self.exec_prefix(self.server_ns), *argv], **kwargs)
        self._procs.append(proc)
        return proc

    def run_client(self, argv: Sequence[str], timeout: float = 60, **kwargs: Any) -> subprocess.CompletedProcess:
        """Run a program to completion in the client namespace."""
        return subprocess.run([*self.exec_prefix(self.client_ns), *argv], timeout=timeout, **kwargs)

    def close(self) -> None:
        """Stop our processes (by PID) and delete our namespaces; safe to call twice."""
        for proc in self._procs:
            stop_pid(proc)
        self._procs.clear()
        while self._made:
            _ip("netns", "del", self._made.pop(), check=False)
