"""The isolated data plane, engine side: start, feed, watch and restart the data-plane process.

The process is its own interpreter (``python -m shadowserve.dataplane.child``, dataplane/child.py)
rather than a multiprocessing child, so a user's script that builds an ``LLM`` with no
``if __name__ == "__main__"`` guard is never re-imported. It talks over two inherited pipes: the
spec and then commands in, completions and heartbeats out; bulk data goes store -> its slots ->
the engine's KV pool in shared memory. The engine side owns every shared segment, so killing the
process (on a hang, or by an operator) loses no memory, and a restarted one attaches to the same
buffers. A process still running when the interpreter exits is stopped then (``weakref.finalize``).
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
import weakref
from multiprocessing.connection import Connection

from shadowserve.dataplane.messages import Completion, FetchCommand, SaveCommand
from shadowserve.dataplane.spec import DataPlaneSpec
from shadowserve.errors import FetchError

CHILD_MODULE = "shadowserve.dataplane.child"


def _child_env() -> dict[str, str]:
    """This environment, with this interpreter's import path: the child imports the same package."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    return env


class _Child:
    """One started data-plane process and the engine's ends of its pipes."""

    def __init__(self, spec: DataPlaneSpec) -> None:
        cmd_read, cmd_write = os.pipe()
        event_read, event_write = os.pipe()
        inherited = (cmd_read, event_write, *spec.pool_handle.inherited_fds())
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", CHILD_MODULE, str(cmd_read), str(event_write)],
                pass_fds=inherited, env=_child_env(), stdin=subprocess.DEVNULL)
        except BaseException:
            os.close(cmd_write)
            os.close(event_read)
            raise
        finally:
            os.close(cmd_read)
            os.close(event_write)
        if spec.cores:  # at once: the child's imports (~1 s of CPU) would otherwise run on the engine's cores
            try:
                os.sched_setaffinity(self.proc.pid, spec.cores)
            except OSError:
                pass  # it already exited (it says why on its pipe), or the cores are gone: it pins itself
        self.events = Connection(event_read, writable=False)
        self.outbox: queue.Queue = queue.Queue()
        self.outbox.put(spec)  # its first message
        # Sends happen on a thread of their own: a hung child with a full pipe never blocks the engine.
        commands = Connection(cmd_write, readable=False)
        threading.Thread(target=self._send_loop, args=(self.outbox, commands), daemon=True,
                         name="dataplane-sender").start()

    @staticmethod
    def _send_loop(outbox: queue.Queue, conn: Connection) -> None:
        try:
            while True:
                cmd = outbox.get()
                conn.send(cmd)
                if cmd is None:
                    return
        except (BrokenPipeError, OSError):
            return
        finally:
            conn.close()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, grace: float) -> None:
        """Ask the process to finish within ``grace`` seconds, then kill it; reap it either way."""
        self.outbox.put(None)  # also ends the sender thread once the pipe breaks
        if grace > 0 and self.alive():
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        if self.alive():
            self.proc.kill()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        self.events.close()


class DataPlaneProcess:
    """Engine-side handle: start, feed, watch and restart the data-plane process."""

    def __init__(self, spec: DataPlaneSpec, start_timeout: float = 120.0) -> None:
        self.spec = spec
        self.start_timeout = start_timeout
        self.restarts = 0
        self.last_stats: dict = {}
        self._child: _Child | None = None
        self._finalizer: weakref.finalize | None = None
        self._starting_until: float | None = None  # set while the current process has not said "ready"
        self._start_error: str | None = None  # why the current process will never be ready
        # The events pipe has one reader at a time: the engine's thread polls it, and ready() may also be
        # asked from /health's or /metrics' thread while a restarted process starts.
        self._pipe_lock = threading.Lock()
        self._spawn()
        self._wait_ready()  # the first start blocks: an engine does not start without its data plane

    def _spawn(self) -> None:
        self._child = child = _Child(self.spec)
        self._finalizer = weakref.finalize(self, child.stop, 5.0)  # unless close() or _kill() runs first
        self._starting_until = time.monotonic() + self.start_timeout
        self._start_error = None
        self._last_beat = time.monotonic()

    def _wait_ready(self) -> None:
        """Block until the process is ready; FetchError (and no process left) if it cannot start."""
        while not self.ready():
            if self._start_error is not None or time.monotonic() > self._starting_until:
                why = self._start_error or f"did not start within {self.start_timeout:g} s"
                self._kill()
                raise FetchError(f"the data-plane process {why}")
            try:
                self._child.events.poll(0.5)
            except (EOFError, OSError):
                pass  # ready() reads the end of the pipe and says why

    def ready(self) -> bool:
        """True once the current process said it is ready (a restarted one takes 1-3 s to import)."""
        if self._child is None:
            return False
        if self._starting_until is None:
            return True
        with self._pipe_lock:
            child = self._child
            if self._starting_until is None:  # another thread read "ready" meanwhile
                return True
            try:  # a starting process sends "ready" or "failed" first, nothing else before it
                while self._start_error is None and child.events.poll(0):
                    kind, payload = child.events.recv()
                    if kind == "ready":
                        self._starting_until = None
                        self._last_beat = time.monotonic()
                        return True
                    if kind == "failed":
                        self._start_error = f"failed to start: {payload}"
            except (EOFError, OSError):
                self._start_error = f"did not start (exit status {child.proc.poll()})"
            if self._start_error is None and not child.alive():
                self._start_error = f"did not start (exit status {child.proc.returncode})"
            return False

    @property
    def pid(self) -> int:
        return self._child.proc.pid

    def submit(self, cmd: FetchCommand | SaveCommand) -> None:
        self._child.outbox.put(cmd)

    def poll(self) -> list[Completion]:
        out: list[Completion] = []
        if not self.ready():  # a starting process sends nothing but "ready" (or why it failed)
            return out
        with self._pipe_lock:
            try:
                while self._child.events.poll(0):
                    kind, payload = self._child.events.recv()
                    self._last_beat = time.monotonic()
                    if kind == "done":
                        out.append(payload)
                    elif kind == "heartbeat":
                        self.last_stats = payload
            except (EOFError, OSError):
                pass  # the process died; healthy() says so
        return out

    def healthy(self) -> bool:
        """Alive and beating; a restarted process still starting counts, until its start timeout."""
        alive = self._child is not None and self._child.alive()
        if not self.ready():
            return alive and self._start_error is None and time.monotonic() < self._starting_until
        return alive and time.monotonic() - self._last_beat < self.spec.config.heartbeat_timeout

    def down_reason(self) -> str:
        """Why the process counts as down: how it exited, or how long its heartbeats have been missing."""
        if self._child is None:
            return "not started"
        if self._start_error is not None:
            return f"process {self._child.proc.pid} {self._start_error}"
        if self._starting_until is not None and time.monotonic() >= self._starting_until:
            return f"process {self._child.proc.pid} did not start within {self.start_timeout:g} s"
        code = self._child.proc.poll()
        if code is not None:
            return f"process {self._child.proc.pid} {exit_description(code)}"
        silent = time.monotonic() - self._last_beat
        return f"process {self._child.proc.pid} missed heartbeats for {silent:.1f} s (limit {self.spec.config.heartbeat_timeout} s)"

    def restart(self) -> None:
        """Kill (if needed) and start a fresh process; after this no old writes can land.

        Does not wait for the new process: its interpreter takes 1-3 s to start, which would stall
        the engine's loop (and every decoding request) that long. ``ready()`` says when it can take
        work; commands submitted before then wait in its pipe.
        """
        with self._pipe_lock:  # no other thread reads the old pipe while it closes
            self._kill()
            self.restarts += 1
            self.last_stats = {}  # no stage counters until the new process's first heartbeat
            self._spawn()

    def _kill(self) -> None:
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        if self._child is not None:
            self._child.stop(grace=0)

    def close(self) -> None:
        """Let the process finish what it holds (a few seconds at most), then make sure it is gone."""
        if self._finalizer is not None:
            self._finalizer()  # child.stop(5.0), once
            self._finalizer = None
        self._child = None


def exit_description(code: int) -> str:
    """``exited with status 1`` or ``was killed by SIGKILL``, from a process exit code."""
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"
