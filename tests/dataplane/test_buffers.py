"""Slot pools: fixed memory, occupancy-based hand-out, back-pressure."""

from __future__ import annotations

import threading
import time

import pytest

from shadowserve.dataplane.buffers import SlotPool
from shadowserve.errors import FetchError


def test_slots_are_distinct_views_of_one_segment():
    pool = SlotPool("t", 3, 100)
    assert pool.slot_bytes == 128  # rounded to a cache line
    a, b = pool.acquire(), pool.acquire()
    pool.slot(a)[:] = 1
    pool.slot(b)[:] = 2
    assert pool.slot(a).sum() == 128 and pool.slot(b).sum() == 256
    assert pool.in_use == 2 and pool.occupancy == pytest.approx(2 / 3)
    pool.release(a)
    pool.release(b)
    assert pool.in_use == 0
    pool.close()


def test_back_pressure_waits_then_times_out():
    pool = SlotPool("t", 1, 64)
    held = pool.acquire()
    got = []
    t = threading.Thread(target=lambda: got.append(pool.acquire(timeout=5)))
    t.start()
    time.sleep(0.1)
    assert not got  # waiting, not allocating more
    pool.release(held)
    t.join(2)
    assert got == [held]
    with pytest.raises(FetchError, match="no free t slot"):
        pool.acquire(timeout=0.05)
    pool.close()


def test_attach_by_name_sees_the_same_bytes():
    owner = SlotPool("t", 2, 64)
    other = SlotPool("t", 2, 64, shm_name=owner.shm_name)
    owner.slot(1)[:4] = [1, 2, 3, 4]
    assert list(other.slot(1)[:4]) == [1, 2, 3, 4]
    other.close()
    owner.close()
