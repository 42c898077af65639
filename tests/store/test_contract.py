"""One contract, every backend: memory, file, our server (with and without auth), Redis, Redis Cluster."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest

from shadowserve.errors import ShadowServeError, StoreError
from shadowserve.store import KVStore


def test_is_a_kvstore(store):
    assert isinstance(store, KVStore)
    assert isinstance(store.stats(), dict)


def test_put_get_roundtrip_and_missing(store, new_key):
    k = new_key()
    assert store.get(k) is None
    store.put(k, b"hello chunk")
    assert store.get(k) == b"hello chunk"
    assert store.get(new_key()) is None


def test_overwrite_replaces_value(store, new_key):
    k = new_key()
    store.put(k, b"first version, longer")
    store.put(k, b"second")
    assert store.get(k) == b"second"


def test_accepts_any_contiguous_buffer_as_data(store, new_key):
    arr = np.arange(1000, dtype=np.float16)
    k1, k2, k3 = new_key(), new_key(), new_key()
    store.put(k1, memoryview(arr))
    store.put(k2, bytearray(b"abc"))
    store.put(k3, memoryview(b"xyzw")[1:3])
    assert store.get(k1) == arr.tobytes()
    assert store.get(k2) == b"abc"
    assert store.get(k3) == b"yz"


def test_empty_value_is_not_missing(store, new_key):
    k = new_key()
    store.put(k, b"")
    assert store.get(k) == b""
    assert store.get_into(k, bytearray(4)) == 0
    assert store.contains([k]) == [True]


def test_get_into_numpy_slot(store, new_key):
    k = new_key()
    value = os.urandom(300_000)
    store.put(k, value)
    pool = np.zeros((2, 400_000), dtype=np.uint8)  # like a slab pool slot
    assert store.get_into(k, pool[1]) == len(value)
    assert pool[1, : len(value)].tobytes() == value
    assert not pool[0].any()
    assert store.get_into(new_key(), pool[0]) is None


def test_get_into_too_small_raises_and_store_stays_usable(store, new_key):
    k, other = new_key(), new_key()
    store.put(k, b"x" * 10_000)
    store.put(other, b"fine")
    with pytest.raises(StoreError, match="10000 bytes"):
        store.get_into(k, bytearray(100))
    assert store.get(other) == b"fine"
    buf = bytearray(10_000)
    assert store.get_into(k, buf) == 10_000


def test_get_into_rejects_readonly_buffer(store, new_key):
    k = new_key()
    store.put(k, b"abc")
    with pytest.raises(StoreError, match="read-only"):
        store.get_into(k, b"\0" * 8)


def test_get_many_into_mixed(store, new_key):
    keys = [new_key() for _ in range(6)]
    values = [os.urandom(n) for n in (1, 1000, 65_536, 200_000)]
    for k, v in zip(keys, values, strict=False):
        store.put(k, v)
    bufs = [bytearray(250_000) for _ in keys]
    sizes = store.get_many_into(keys, bufs)
    assert sizes == [1, 1000, 65_536, 200_000, None, None]
    for v, b in zip(values, bufs, strict=False):
        assert bytes(b[: len(v)]) == v
    with pytest.raises(StoreError):
        store.get_many_into(keys, bufs[:2])
    assert store.get_many_into([], []) == []


def test_get_many_into_too_small_reports_and_keeps_others(store, new_key):
    a, b = new_key(), new_key()
    store.put(a, b"a" * 5000)
    store.put(b, b"b" * 10)
    second = bytearray(100)
    with pytest.raises(StoreError, match="5000 bytes"):
        store.get_many_into([a, b], [bytearray(100), second])
    assert bytes(second[:10]) == b"b" * 10  # the value that fit was still delivered
    assert store.get_many_into([b], [bytearray(100)]) == [10]


def test_contains_and_longest_prefix(store, new_key):
    chain = [new_key() for _ in range(6)]
    for k in chain[:3] + chain[4:]:  # a gap at index 3
        store.put(k, b"v")
    assert store.contains(chain) == [True, True, True, False, True, True]
    assert store.longest_prefix(chain) == 3
    assert store.longest_prefix(chain[4:]) == 2
    assert store.longest_prefix([new_key()]) == 0
    assert store.longest_prefix([]) == 0
    assert store.contains([]) == []


def test_many_keys_in_one_call(store, new_key):
    keys = [new_key() for _ in range(5000)]
    store.put(keys[0], b"1")
    store.put(keys[4500], b"2")
    flags = store.contains(keys)
    assert flags[0] and flags[4500] and sum(flags) == 2


def test_large_value(store, new_key):
    k = new_key()
    value = np.random.default_rng(0).integers(0, 256, 8 << 20, dtype=np.uint8)
    store.put(k, value)
    out = np.empty(9 << 20, dtype=np.uint8)
    assert store.get_into(k, out) == value.size
    assert np.array_equal(out[: value.size], value)


def test_bad_keys_are_store_errors(store):
    for bad in ("text", b"", b"x" * 5000, 42):
        with pytest.raises(StoreError):
            store.put(bad, b"v")  # type: ignore[arg-type]
    assert issubclass(StoreError, ShadowServeError)


def test_concurrent_threads(store, new_key):
    """The data plane's fetch workers share one store object."""
    keys = [new_key() for _ in range(32)]
    values = [os.urandom(20_000 + i) for i in range(32)]
    errors: list[BaseException] = []

    def worker(idx: int) -> None:
        try:
            buf = np.empty(64_000, dtype=np.uint8)
            for j in range(idx, 32, 4):
                store.put(keys[j], values[j])
            for _ in range(3):
                for j in range(idx, 32, 4):
                    n = store.get_into(keys[j], buf)
                    assert buf[:n].tobytes() == values[j]
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert store.longest_prefix(keys) == 32
