"""The local compressed tier on its own: pages, LRU order, admission rules, events, corruption."""

from __future__ import annotations

import numpy as np
import pytest

from shadowserve.dataplane.local_tier import LocalTier, page_size_for


def blob(n: int, seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def test_chunks_round_trip_across_pages():
    tier = LocalTier(64 * 1024, 4096)
    data = {b"a": blob(10_000, 1), b"b": blob(4096, 2), b"c": blob(1, 3)}
    for k, v in data.items():
        assert tier.put(k, v)
    out = np.zeros(20_000, dtype=np.uint8)
    for k, v in data.items():
        n = tier.get_into(k, out)
        assert n == len(v) and out[:n].tobytes() == v
    assert tier.get_into(b"missing", out) is None
    assert tier.stats()["chunks"] == 3 and tier.stats()["bytes"] == 10_000 + 4096 + 1
    assert tier.stats()["used_bytes"] == (3 + 1 + 1) * 4096  # pages, not slots: little waste


def test_lru_evicts_least_recently_used_and_reports_it():
    tier = LocalTier(4 * 4096, 4096)  # room for four one-page chunks
    for i in range(4):
        tier.put(bytes([i]), blob(4000, i))
    tier.drain_events()
    tier.get_into(bytes([0]), np.zeros(4096, dtype=np.uint8))  # 0 is now the most recent
    tier.put(b"new", blob(8000, 9))  # needs two pages: evicts 1 and 2
    assert [bytes([k]) in tier for k in range(4)] == [True, False, False, True]
    assert tier.evictions == 2
    assert tier.drain_events() == [(bytes([1]), False), (bytes([2]), False), (b"new", True)]
    assert tier.drain_events() == []


def test_a_chunk_larger_than_the_tier_is_refused():
    tier = LocalTier(8192, 4096)
    assert not tier.put(b"big", blob(9000, 1))
    assert tier.stats()["chunks"] == 0


@pytest.mark.parametrize("rule,admitted_after", [("first", 1), ("second", 2)])
def test_admission_of_fetched_chunks(rule, admitted_after):
    tier = LocalTier(64 * 1024, 4096, admission=rule)
    for fetch in range(1, 3):
        tier.admit_fetched(b"k", blob(5000, 1))
        assert (b"k" in tier) == (fetch >= admitted_after)
    assert tier.put(b"saved", blob(10, 2)) and b"saved" in tier  # saves are always admitted


def test_dropped_entry_is_gone_and_counted():
    tier = LocalTier(64 * 1024, 4096)
    tier.put(b"k", blob(5000, 1))
    pages = tier.view(b"k")
    assert sum(len(p) for p in pages) == 5000
    tier.drop(b"k")
    assert b"k" not in tier and tier.corrupt == 1 and tier.stats()["bytes"] == 0


def test_page_size_follows_the_chunk():
    assert page_size_for(1000) == 4096
    assert page_size_for(256 * 23_040) == 128 * 1024  # a smollm2 chunk: ~5.9 MB raw
    assert page_size_for(10**12) == 1 << 20
