"""The isolated data plane: the pipeline in its own process, pinned to reserved cores.

Only small messages cross the pipes (commands in; completions and heartbeats out). Bulk data goes
store -> this process's slots -> the engine's KV pool in shared memory. The engine side owns every
shared segment, so killing this process (on a hang, or by an operator) loses no memory, and a
restarted one attaches to the same buffers.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import threading
import time

import torch

from shadowserve.dataplane.messages import Completion, FetchCommand, SaveCommand
from shadowserve.dataplane.spec import DataPlaneSpec, build_pipeline
from shadowserve.errors import FetchError


def _child_main(spec: DataPlaneSpec, commands, events) -> None:
    """Entry point of the data-plane process."""
    if spec.cores:
        os.sched_setaffinity(0, spec.cores)
    # The pipeline's parallelism is its stage workers; torch's intra-op threads on top of them would
    # oversubscribe the reserved cores (spinning OpenMP teams starve the decompress threads).
    torch.set_num_threads(1)
    send_lock = threading.Lock()

    def send(msg) -> None:
        with send_lock:
            try:
                events.send(msg)
            except (BrokenPipeError, OSError):
                os._exit(0)  # the engine is gone; nothing left to serve

    try:
        pool = spec.pool_handle.attach()
        pipeline = build_pipeline(spec, pool.tensor)
    except Exception as exc:
        send(("failed", f"{type(exc).__name__}: {exc}"))
        return
    send(("ready", os.getpid()))

    def heartbeat() -> None:
        while True:
            time.sleep(spec.config.heartbeat_interval)
            send(("heartbeat", pipeline.stats()))

    threading.Thread(target=heartbeat, daemon=True).start()
    while True:
        try:
            cmd = commands.recv()
        except (EOFError, OSError):
            break
        if cmd is None:
            break
        pipeline.submit(cmd, lambda c: send(("done", c)))
    pipeline.close()
    pool.close()


class DataPlaneProcess:
    """Engine-side handle: start, feed, watch and restart the data-plane process."""

    def __init__(self, spec: DataPlaneSpec, start_timeout: float = 120.0) -> None:
        self.spec = spec
        self.start_timeout = start_timeout
        self.restarts = 0
        self.last_stats: dict = {}
        self._proc = None
        self._start()

    def _start(self) -> None:
        ctx = mp.get_context("spawn")  # never fork a process that holds torch threads
        cmd_recv, self._cmd_send = ctx.Pipe(duplex=False)
        self._events, ev_send = ctx.Pipe(duplex=False)
        self._proc = ctx.Process(target=_child_main, args=(self.spec, cmd_recv, ev_send),
                                 name="shadowserve-dataplane", daemon=True)
        self._proc.start()
        cmd_recv.close()
        ev_send.close()
        deadline = time.monotonic() + self.start_timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self._events.poll(min(left, 0.5)):
                if left <= 0 or not self._proc.is_alive():
                    self._kill()
                    raise FetchError("the data-plane process did not start")
                continue
            kind, payload = self._events.recv()
            if kind == "ready":
                break
            if kind == "failed":
                self._kill()
                raise FetchError(f"the data-plane process failed to start: {payload}")
        self._last_beat = time.monotonic()
        self._outbox: queue.Queue = queue.Queue()
        # Sends happen on a thread of their own: a hung child with a full pipe never blocks the engine.
        self._sender = threading.Thread(target=self._send_loop, args=(self._outbox, self._cmd_send), daemon=True)
        self._sender.start()

    @property
    def pid(self) -> int:
        return self._proc.pid

    @staticmethod
    def _send_loop(outbox: queue.Queue, conn) -> None:
        try:
            while True:
                cmd = outbox.get()
                try:
                    conn.send(cmd)
                except (BrokenPipeError, OSError):
                    return
                if cmd is None:
                    return
        finally:
            conn.close()

    def submit(self, cmd: FetchCommand | SaveCommand) -> None:
        self._outbox.put(cmd)

    def poll(self) -> list[Completion]:
        out = []
        try:
            while self._events.poll(0):
                kind, payload = self._events.recv()
                self._last_beat = time.monotonic()
                if kind == "done":
                    out.append(payload)
                elif kind == "heartbeat":
                    self.last_stats = payload
        except (EOFError, OSError):
            pass  # the process died; healthy() says so
        return out

    def healthy(self) -> bool:
        alive = self._proc is not None and self._proc.is_alive()
        return alive and time.monotonic() - self._last_beat < self.spec.config.heartbeat_timeout

    def restart(self) -> None:
        """Kill (if needed) and start a fresh process; after this no old writes can land."""
        self._kill()
        self._outbox.put(None)  # ends the old sender thread, which closes the old pipe
        self.restarts += 1
        self.last_stats = {}  # not ready again until the new process's first heartbeat
        self._start()

    def _kill(self) -> None:
        if self._proc is not None and self._proc.is_alive():
            self._proc.kill()
        if self._proc is not None:
            self._proc.join(timeout=10)

    def close(self) -> None:
        if self._proc is None:
            return
        if self._proc.is_alive():
            self._outbox.put(None)
            self._proc.join(timeout=5)
        self._kill()
        self._proc = None
