"""Start ``shadowserve serve`` as a child process and wait until ``/health`` answers (tests, benchmarks)."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

from shadowserve.errors import ShadowServeError
from shadowserve.store.launch import Launched, free_port, stop_pid


def start_api_server(*extra_args: str, host: str = "127.0.0.1", timeout: float = 120.0,
                     env: dict[str, str] | None = None) -> Launched:
    """A real API server on a free port; ``.url`` is its base (``http://host:port``), ``.stop()`` ends it.

    Its output goes to ``<workdir>/server.log``, quoted in the error if it fails to come up.
    """
    port = free_port(host)
    workdir = tempfile.mkdtemp(prefix="ss-api-")
    log_path = f"{workdir}/server.log"
    args = [sys.executable, "-m", "shadowserve.cli", "serve", "--host", host, "--port", str(port), *extra_args]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)
    launched = Launched(f"http://{host}:{port}", [proc], workdir)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            with urllib.request.urlopen(f"{launched.url}/health", timeout=1) as r:
                if r.status == 200:
                    return launched
        except (urllib.error.URLError, OSError):
            time.sleep(0.1)
    stop_pid(proc)
    with open(log_path) as f:
        tail = f.read()[-2000:]
    launched.stop()
    raise ShadowServeError(f"the API server did not become healthy within {timeout}s:\n{tail}")
