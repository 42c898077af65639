"""The faults a soak run injects into a live server and its store, and when each one fires.

Every fault is something an operator or the machine can do to a deployment: the data-plane
process dies (SIGKILL), the store server goes away and comes back on the same port, stored chunks
are damaged (overwritten with garbage, truncated, a flipped bit), and the store refuses writes
(restarted with a capacity below one chunk, so every PUT is turned away). A fault is a window:
it begins, the load runs through it, and it ends (the store comes back with its normal capacity).
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass

from shadowserve.bench.common.proc_tree import dataplane_pid
from shadowserve.store import open_store
from shadowserve.store.launch import Launched, start_store_server

FAULTS = ("dataplane-kill", "store-restart", "store-corrupt", "store-full")
STEADY = "steady"


@dataclass(frozen=True)
class Window:
    """One fault, active from ``start`` to ``end`` seconds after the run began."""

    fault: str
    start: float
    end: float


def fault_schedule(duration_s: float, rounds: int) -> list[Window]:
    """Every fault ``rounds`` times, in turn, each window between two steady ones of the same length."""
    names = [f for _ in range(rounds) for f in FAULTS]
    width = duration_s / (2 * len(names) + 1)
    return [Window(name, (2 * i + 1) * width, (2 * i + 2) * width) for i, name in enumerate(names)]


class StoreHandle:
    """The store server child, kept on one port so the API server's clients find its replacement."""

    def __init__(self, capacity: str) -> None:
        self.capacity = capacity
        self._proc: Launched | None = start_store_server("--capacity", capacity)
        self.url = self._proc.url
        self.port = urllib.parse.urlsplit(self.url).port

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.stop()
            self._proc = None

    def start(self, capacity: str | None = None) -> None:
        self.stop()
        self._proc = start_store_server("--capacity", capacity or self.capacity, port=self.port)


def corrupt_chunks(store_url: str, keys: Sequence[bytes], rng: random.Random) -> int:
    """Damage every stored chunk among ``keys`` in one of three ways, in turn; returns how many.

    Garbage of the same length, the first half only, and one flipped bit in the last KiB (the
    payload, which only the container's checksum can tell apart from good KV).
    """
    store = open_store(store_url)
    damaged = 0
    try:
        for key in keys:
            value = store.get(key)
            if value is None:
                continue
            kind = damaged % 3
            if kind == 0:
                bad = rng.randbytes(len(value))
            elif kind == 1:
                bad = value[: len(value) // 2]
            else:
                flipped = bytearray(value)
                flipped[len(value) - 1 - rng.randrange(min(len(value), 1024))] ^= 1 << rng.randrange(8)
                bad = bytes(flipped)
            store.put(key, bad)
            damaged += 1
    finally:
        store.close()
    return damaged


@dataclass
class FaultEvent:
    at_s: float
    fault: str
    action: str  # "begin" | "end"
    detail: str
    ok: bool = True


class FaultInjector:
    """Runs a schedule on a thread; ``phase`` names the fault active now (or ``steady``)."""

    def __init__(self, server_pid: int, store: StoreHandle, keys: Sequence[bytes], full_capacity: str,
                 seed: int = 0) -> None:
        self.server_pid, self.store, self.keys = server_pid, store, list(keys)
        self.full_capacity = full_capacity
        self.rng = random.Random(seed)
        self.phase = STEADY
        self.events: list[FaultEvent] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = 0.0

    def run(self, schedule: list[Window], t0: float) -> None:
        """Start the schedule (times relative to ``t0``, a ``time.monotonic()``) on a background thread."""
        self._t0 = t0
        self._thread = threading.Thread(target=self._loop, args=(schedule,), name="soak-faults", daemon=True)
        self._thread.start()

    def join(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def fired(self) -> dict[str, int]:
        """Windows of each fault that began successfully."""
        counts = dict.fromkeys(FAULTS, 0)
        for e in self.events:
            if e.action == "begin" and e.ok:
                counts[e.fault] += 1
        return counts

    def _loop(self, schedule: list[Window]) -> None:
        for w in schedule:
            for at, action in ((w.start, "begin"), (w.end, "end")):
                if self._stop.wait(max(0.0, self._t0 + at - time.monotonic())):
                    if action == "end":  # never leave the store down or small
                        self._apply(w.fault, action)
                    return
                self._apply(w.fault, action)

    def _apply(self, fault: str, action: str) -> None:
        at = time.monotonic() - self._t0
        try:
            detail = getattr(self, f"_{action}_{fault.replace('-', '_')}")()
            ok = True
        except Exception as exc:  # reported, never fatal: the run goes on and the table says so
            detail, ok = f"{type(exc).__name__}: {exc}", False
        self.events.append(FaultEvent(round(at, 2), fault, action, detail, ok))
        self.phase = fault if action == "begin" else STEADY

    def _begin_dataplane_kill(self) -> str:
        pid = dataplane_pid(self.server_pid)
        if pid is None:
            raise RuntimeError("no data-plane process found under the server")
        os.kill(pid, signal.SIGKILL)
        return f"SIGKILL to data plane pid {pid}"

    def _end_dataplane_kill(self) -> str:
        pid = dataplane_pid(self.server_pid)
        return f"data plane now pid {pid}" if pid else "no data plane yet"

    def _begin_store_restart(self) -> str:
        self.store.stop()
        return "store stopped"

    def _end_store_restart(self) -> str:
        self.store.start()
        return f"store back on port {self.store.port} (empty)"

    def _begin_store_corrupt(self) -> str:
        n = corrupt_chunks(self.store.url, self.keys, self.rng)
        return f"damaged {n} of {len(self.keys)} workload chunks"

    def _end_store_corrupt(self) -> str:
        return "-"

    def _begin_store_full(self) -> str:
        self.store.start(self.full_capacity)
        return f"store restarted with capacity {self.full_capacity}: every PUT refused"

    def _end_store_full(self) -> str:
        self.store.start()
        return f"store back with capacity {self.store.capacity} (empty)"
