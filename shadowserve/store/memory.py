"""In-process store and the byte-capacity LRU table that the store server also uses."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from shadowserve.errors import StoreError
from shadowserve.store.base import StoreBase, check_key, too_large, writable_view


class LRUTable:
    """Thread-safe key → value map that evicts least-recently-read values beyond ``capacity`` bytes.

    Values are stored as given (the caller hands over ownership), so the server can keep the
    buffer it received into and send it back without copying. Readers get a reference; since
    values are never mutated after insertion, sending one after it was evicted is still safe.
    """

    def __init__(self, capacity: int | None = None) -> None:
        self.capacity = capacity
        self._items: OrderedDict[bytes, bytes | bytearray] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.evictions = 0
        self.hits = 0
        self.misses = 0
        self.puts = 0

    def put(self, key: bytes, value: bytes | bytearray) -> None:
        size = len(value)
        if self.capacity is not None and size > self.capacity:
            raise StoreError(f"value of {size} bytes exceeds the store capacity of {self.capacity} bytes")
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= len(old)
            self._items[key] = value
            self._bytes += size
            self.puts += 1
            if self.capacity is not None:
                while self._bytes > self.capacity:
                    _, evicted = self._items.popitem(last=False)
                    self._bytes -= len(evicted)
                    self.evictions += 1

    def get(self, key: bytes) -> bytes | bytearray | None:
        """The value (marked recently used), or None."""
        with self._lock:
            value = self._items.get(key)
            if value is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return value

    def get_many(self, keys: Sequence[bytes]) -> list[bytes | bytearray | None]:
        with self._lock:
            out: list[bytes | bytearray | None] = []
            for key in keys:
                value = self._items.get(key)
                if value is None:
                    self.misses += 1
                else:
                    self._items.move_to_end(key)
                    self.hits += 1
                out.append(value)
            return out

    def contains(self, keys: Sequence[bytes]) -> list[bool]:
        """Presence only; does not count as a use for LRU."""
        with self._lock:
            return [k in self._items for k in keys]

    def longest_prefix(self, keys: Sequence[bytes]) -> int:
        with self._lock:
            n = 0
            for k in keys:
                if k not in self._items:
                    break
                n += 1
            return n

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "keys": len(self._items),
                "bytes": self._bytes,
                "capacity": self.capacity,
                "hits": self.hits,
                "misses": self.misses,
                "puts": self.puts,
                "evictions": self.evictions,
            }


class MemoryStore(StoreBase):
    """``memory://``: values live in this process (tests, single-process runs)."""

    _named: dict[str, MemoryStore] = {}
    _named_lock = threading.Lock()

    def __init__(self, capacity: int | None = None) -> None:
        self.table = LRUTable(capacity)

    @classmethod
    def named(cls, name: str, capacity: int | None = None) -> MemoryStore:
        """An anonymous store for ``""``; otherwise the process-wide store of that name."""
        if not name:
            return cls(capacity)
        with cls._named_lock:
            store = cls._named.get(name)
            if store is None:
                store = cls._named[name] = cls(capacity)
            return store

    def put(self, key: bytes, data: bytes | memoryview) -> None:
        self.table.put(check_key(key), bytes(data))

    def get(self, key: bytes) -> bytes | None:
        value = self.table.get(check_key(key))
        return None if value is None else bytes(value)

    def get_into(self, key: bytes, buffer: Any) -> int | None:
        """Copy the value into ``buffer``; allocates nothing once the value exists."""
        key = check_key(key)
        dest = writable_view(buffer)
        value = self.table.get(key)
        if value is None:
            return None
        n = len(value)
        if n > len(dest):
            raise too_large(key, n, len(dest))
        dest[:n] = value
        return n

    def contains(self, keys: Sequence[bytes]) -> list[bool]:
        return self.table.contains([check_key(k) for k in keys])

    def longest_prefix(self, keys: Sequence[bytes]) -> int:
        return self.table.longest_prefix([check_key(k) for k in keys])

    def stats(self) -> dict[str, Any]:
        return {"backend": "memory", **self.table.stats()}

    def close(self) -> None:
        """Nothing to release; named stores live as long as the process."""
