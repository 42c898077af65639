"""Pre-registered buffers: fixed pools of equal slots in shared memory, handed out by occupancy.

Every byte the pipeline touches is allocated (and first-touched) once at start-up; a chunk holds a
slot only while a stage works on it, and a stage that finds its pool empty waits (back-pressure)
instead of allocating more. Slots that feed a GPU live in page-locked (pinned) host memory, so the
copy engine reads them directly and a copy can run asynchronously on a stream.
"""

from __future__ import annotations

import threading
import time
from collections import deque

import numpy as np
import torch

from shadowserve.dataplane.shm import Segment
from shadowserve.errors import FetchError


class SlotPool:
    """``num_slots`` slots of ``slot_bytes`` each, in one shared-memory segment."""

    def __init__(self, name: str, num_slots: int, slot_bytes: int, shm_name: str | None = None,
                 pinned: bool = False) -> None:
        """Create the segment, or attach to ``shm_name`` (made by a parent that outlives restarts).

        ``pinned``: private page-locked memory instead (CUDA copies); freed with this process, so a
        killed data plane leaks nothing, and made once per process start.
        """
        self.name, self.num_slots = name, num_slots
        self.slot_bytes = (slot_bytes + 63) // 64 * 64  # keep every slot cache-line aligned
        self._owner = shm_name is None
        self._shm = None
        self._pinned = None
        if pinned:
            if shm_name is not None:
                raise ValueError("a pinned slot pool is private to its process; it cannot attach to shared memory")
            self._pinned = torch.empty((self.num_slots, self.slot_bytes), dtype=torch.uint8, pin_memory=True)
            self.array = self._pinned.numpy()
        elif self._owner:  # unlinked by close() or, if nobody calls it, at interpreter exit
            self._shm = Segment.create(f"slots-{name}", self.num_slots * self.slot_bytes)
        else:
            self._shm = Segment.attach(shm_name)
        if self._shm is not None:
            self.array = np.ndarray((self.num_slots, self.slot_bytes), dtype=np.uint8, buffer=self._shm.buf)
        if self._owner:
            self.array.fill(0)  # first touch now, not on the hot path
        else:
            int(self.array.reshape(-1)[::4096].sum())  # map every page into this process up front
        self._free = deque(range(num_slots))
        self._cond = threading.Condition()
        self._closed = False
        # Occupancy over time (slot-seconds since the window opened) and the peak: two floats and an
        # int updated under the lock we already hold, so the accounting costs no allocation.
        self._window_start = self._mark = time.perf_counter()
        self._slot_seconds = 0.0
        self._wait_s = 0.0
        self._peak = 0

    def acquire(self, timeout: float | None = None) -> int:
        """Take a free slot, waiting while all are busy; FetchError after ``timeout`` or on close."""
        with self._cond:
            if not self._free:  # back-pressure: count how long acquirers wait (stage busy time includes it)
                t0 = time.perf_counter()
                ok = self._cond.wait_for(lambda: self._free or self._closed, timeout)
                self._wait_s += time.perf_counter() - t0
                if not ok:
                    raise FetchError(f"no free {self.name} slot within {timeout:.1f}s")
            if self._closed:
                raise FetchError(f"{self.name} pool is closed")
            self._account()
            slot = self._free.popleft()
            self._peak = max(self._peak, self.num_slots - len(self._free))
            return slot

    def release(self, slot: int) -> None:
        with self._cond:
            self._account()
            self._free.append(slot)
            self._cond.notify()

    def _account(self) -> None:
        now = time.perf_counter()
        self._slot_seconds += (self.num_slots - len(self._free)) * (now - self._mark)
        self._mark = now

    def window(self) -> dict:
        """Mean occupancy (0-1, time-weighted), peak slots in use and seconds acquirers waited for a free
        slot, since the window opened."""
        with self._cond:
            self._account()
            elapsed = max(1e-9, self._mark - self._window_start)
            return {"mean_occupancy": self._slot_seconds / (elapsed * self.num_slots), "peak_in_use": self._peak,
                    "slots": self.num_slots, "wait_s": self._wait_s}

    def reset_window(self) -> None:
        """Start a new accounting window now (a benchmark measures one run at a time)."""
        with self._cond:
            self._window_start = self._mark = time.perf_counter()
            self._slot_seconds = 0.0
            self._wait_s = 0.0
            self._peak = self.num_slots - len(self._free)

    def slot(self, index: int) -> np.ndarray:
        """The slot's bytes as a writable uint8 array (a view: no copy)."""
        return self.array[index]

    def tensor(self, index: int):
        """The slot's bytes as a uint8 torch tensor (a view; pinned when the pool is)."""
        return self._pinned[index] if self._pinned is not None else torch.from_numpy(self.array[index])

    @property
    def pinned(self) -> bool:
        return self._pinned is not None

    @property
    def shm_name(self) -> str | None:
        return None if self._shm is None else self._shm.name

    @property
    def in_use(self) -> int:
        return self.num_slots - len(self._free)

    @property
    def occupancy(self) -> float:
        return self.in_use / self.num_slots

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self.array = None
        self._pinned = None
        if self._shm is not None:
            self._shm.close()  # the owner's close also unlinks
