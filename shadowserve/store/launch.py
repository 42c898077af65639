"""Start and stop real store servers as child processes (tests, benchmarks, experiments).

Each launcher picks free loopback ports, waits until the server answers, and stops it by
PID (SIGTERM, then SIGKILL) so nothing outlives the caller.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from urllib.parse import urlencode

from shadowserve.errors import StoreError


def free_port(host: str = "127.0.0.1", with_bus: bool = False) -> int:
    """A currently free TCP port; with ``with_bus`` also port+10000 (Redis Cluster's bus)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if not with_bus:
            return port
        if port + 10000 > 65535:
            continue
        try:
            with socket.socket() as s:
                s.bind((host, port + 10000))
            return port
        except OSError:
            continue
    raise StoreError("no free port pair found")


def stop_pid(proc: subprocess.Popen, grace: float = 5.0) -> None:
    """SIGTERM the process by PID, SIGKILL it if it lingers, and reap it."""
    if proc.poll() is not None:
        return
    try:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=grace)
    except ProcessLookupError:
        pass


def _wait_port(host: str, port: int, proc: subprocess.Popen, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise StoreError(f"{what} exited with status {proc.returncode} before listening on {host}:{port}")
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    stop_pid(proc)
    raise StoreError(f"{what} did not listen on {host}:{port} within {timeout}s")


@dataclass
class Launched:
    """A running server: its URL, its processes (stopped by PID) and a scratch directory."""

    url: str
    procs: list[subprocess.Popen] = field(default_factory=list)
    workdir: str | None = None

    @property
    def pid(self) -> int:
        return self.procs[0].pid

    def stop(self) -> None:
        for proc in self.procs:
            stop_pid(proc)
        if self.workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Launched:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_store_server(*extra_args: str, host: str = "127.0.0.1", timeout: float = 20.0,
                       token: str | None = None, port: int | None = None) -> Launched:
    """``shadowserve store serve`` in a child process on ``port`` (default: a free one).

    A fixed port lets a caller stop a store and start another where clients still point.
    """
    port = port or free_port(host)
    workdir = tempfile.mkdtemp(prefix="ss-store-")
    # The store command module directly: `python -m shadowserve.cli` would build every subcommand.
    args = [sys.executable, "-m", "shadowserve.commands.store", "serve", "--host", host, "--port", str(port), *extra_args]
    query = ""
    if token is not None:
        token_file = os.path.join(workdir, "token")
        with open(token_file, "w") as f:
            f.write(token)
        args += ["--token-file", token_file]
        query = f"?token_file={token_file}"
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_port(host, port, proc, timeout, "store server")
    return Launched(f"shadowserve://{host}:{port}{query}", [proc], workdir)


def redis_available() -> tuple[bool, str]:
    """Whether ``redis-server`` and ``redis-cli`` are on PATH (reason if not)."""
    missing = [b for b in ("redis-server", "redis-cli") if shutil.which(b) is None]
    if missing:
        return False, f"{' and '.join(missing)} not on PATH (apt-get install -y redis-server)"
    return True, ""


@dataclass(frozen=True)
class RedisTLS:
    """Certificate files for a redis-server that speaks only TLS (clients need no certificate)."""

    cert_file: str
    key_file: str
    ca_file: str  # what clients verify the server against (for a self-signed cert: the cert itself)

    def server_args(self) -> list[str]:
        return ["--tls-cert-file", self.cert_file, "--tls-key-file", self.key_file,
                "--tls-ca-cert-file", self.ca_file, "--tls-auth-clients", "no"]

    def cli_args(self) -> list[str]:
        return ["--tls", "--cacert", self.ca_file]

    def query(self) -> str:
        return "?" + urlencode({"ssl_ca_certs": self.ca_file})


def _redis_args(port: int, host: str, workdir: str, tls: RedisTLS | None = None) -> list[str]:
    ports = ["--port", str(port)] if tls is None else ["--port", "0", "--tls-port", str(port), *tls.server_args()]
    return [
        "redis-server", *ports, "--bind", host, "--save", "", "--appendonly", "no",
        "--dir", workdir, "--protected-mode", "no", "--daemonize", "no", "--loglevel", "warning",
    ]


def start_redis(host: str = "127.0.0.1", timeout: float = 20.0, tls: RedisTLS | None = None,
                extra_args: Sequence[str] = ()) -> Launched:
    """A throw-away ``redis-server`` with persistence off; ``tls`` makes it TLS-only (a rediss:// URL).

    ``extra_args`` go to redis-server as they are (e.g. ``--user alice on '>pw' '~*' '+@all'``).
    """
    ok, why = redis_available()
    if not ok:
        raise StoreError(why)
    workdir = tempfile.mkdtemp(prefix="ss-redis-")
    port = free_port(host)
    proc = subprocess.Popen(_redis_args(port, host, workdir, tls) + list(extra_args),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_port(host, port, proc, timeout, "redis-server")
    url = f"redis://{host}:{port}/0" if tls is None else f"rediss://{host}:{port}/0{tls.query()}"
    return Launched(url, [proc], workdir)


def start_redis_cluster(masters: int = 3, host: str = "127.0.0.1", timeout: float = 30.0,
                        tls: RedisTLS | None = None) -> Launched:
    """``masters`` cluster-enabled redis-servers joined with ``redis-cli --cluster create``.

    With ``tls`` the nodes speak TLS to clients and to each other (a rediss+cluster:// URL).
    """
    cli = ["redis-cli", *(tls.cli_args() if tls else [])]
    ok, why = redis_available()
    if not ok:
        raise StoreError(why)
    workdir = tempfile.mkdtemp(prefix="ss-rcluster-")
    launched = Launched("", [], workdir)
    try:
        ports = []
        for i in range(masters):
            port = free_port(host, with_bus=True)
            while port in ports:
                port = free_port(host, with_bus=True)
            node_dir = os.path.join(workdir, str(i))
            os.makedirs(node_dir)
            args = _redis_args(port, host, node_dir, tls) + [
                "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "5000",
            ] + (["--tls-cluster", "yes"] if tls else [])
            launched.procs.append(subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            ports.append(port)
        for proc, port in zip(launched.procs, ports, strict=True):
            _wait_port(host, port, proc, timeout, "redis-server (cluster node)")
        create = subprocess.run(
            [*cli, "--cluster", "create", *[f"{host}:{p}" for p in ports], "--cluster-replicas", "0",
             "--cluster-yes"],
            capture_output=True, text=True, timeout=timeout,
        )
        if create.returncode != 0:
            raise StoreError(f"redis-cli --cluster create failed: {create.stdout[-500:]} {create.stderr[-500:]}")
        deadline = time.monotonic() + timeout
        while True:
            states = [
                subprocess.run([*cli, "-h", host, "-p", str(p), "cluster", "info"], capture_output=True,
                               text=True, timeout=5).stdout
                for p in ports
            ]
            if all("cluster_state:ok" in s for s in states):
                break
            if time.monotonic() > deadline:
                raise StoreError("redis cluster did not reach cluster_state:ok")
            time.sleep(0.1)
        launched.url = (f"redis+cluster://{host}:{ports[0]}" if tls is None
                        else f"rediss+cluster://{host}:{ports[0]}{tls.query()}")
        return launched
    except BaseException:
        launched.stop()
        raise
