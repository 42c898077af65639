"""The local compressed tier: a fixed pool of compressed chunks in the data plane's own memory.

It sits between the engine's KV blocks and the shared store (DESIGN.md §3, Tiers). Chunks are kept
*compressed* (the container exactly as stored), so a byte of tier holds ~6x the tokens an
uncompressed host tier would, and a tier hit skips only the network: the bytes still go through
decompress, which checks the container, so a corrupt entry is caught there, dropped and refetched.

Memory is one arena cut into equal pages, allocated once; a chunk takes as many pages as its bytes
need (no per-size slots, so compressed chunks of any size pack without waste beyond one page).
Eviction is LRU. Admission: every saved chunk (write-through), and a chunk fetched from the store on
its first fetch (``first``) or only on its second (``second``: a scan of one-off documents then cannot
flush the reused ones). Changes to the key set are queued as events that completions carry to the
control plane, which keeps a directory of the tier for lookups and cost estimates.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np

ADMISSIONS = ("first", "second")


def page_size_for(raw_chunk_bytes: int) -> int:
    """Pages of about 1/64 of a raw chunk (a compressed chunk is ~1/6 of one: ~10 pages), 4 KiB to 1 MiB."""
    want = max(4096, min(1 << 20, raw_chunk_bytes // 64))
    return 1 << (want - 1).bit_length()


class LocalTier:
    """LRU pool of compressed chunks over a fixed arena; every method is thread-safe."""

    def __init__(self, capacity: int, page_bytes: int, admission: str = "first") -> None:
        if admission not in ADMISSIONS:
            raise ValueError(f"unknown admission rule {admission!r}")
        self.page_bytes = page_bytes
        self.num_pages = capacity // page_bytes
        self.capacity = self.num_pages * page_bytes
        self.admission = admission
        self._arena = np.zeros(self.capacity, dtype=np.uint8)  # the only allocation of tier memory
        self._free = list(range(self.num_pages - 1, -1, -1))
        self._entries: OrderedDict[bytes, tuple[list[int], int]] = OrderedDict()  # key -> (pages, nbytes)
        self._seen_once: OrderedDict[bytes, None] = OrderedDict()  # ``second``: keys fetched once, bounded
        self._events: list[tuple[bytes, bool]] = []  # (key, now present?) since the last drain
        self._lock = threading.Lock()
        self.nbytes = 0
        self.hits = self.misses = self.evictions = self.admitted = self.corrupt = 0

    def get_into(self, key: bytes, out: np.ndarray) -> int | None:
        """Hot path: copy the chunk's bytes into ``out`` (a receive slot) and mark it recent; None on a miss."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry[1] > len(out):
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            pages, n = entry
            pb = self.page_bytes
            for i, p in enumerate(pages):
                take = min(pb, n - i * pb)
                out[i * pb : i * pb + take] = self._arena[p * pb : p * pb + take]
            self.hits += 1
            return n

    def put(self, key: bytes, data) -> bool:
        """Admit a chunk unconditionally (the save path: write-through); False if it can never fit."""
        with self._lock:
            return self._store(key, data)

    def admit_fetched(self, key: bytes, data) -> bool:
        """A chunk just came from the store: keep it if the admission rule says so."""
        with self._lock:
            if self.admission == "second" and key not in self._entries:
                if key not in self._seen_once:
                    self._seen_once[key] = None
                    if len(self._seen_once) > max(64, self.num_pages):
                        self._seen_once.popitem(last=False)
                    return False
                del self._seen_once[key]
            return self._store(key, data)

    def _store(self, key: bytes, data) -> bool:
        src = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data
        n = len(src)
        need = -(-n // self.page_bytes)
        if n == 0 or need > self.num_pages:
            return False
        old = self._entries.pop(key, None)
        if old is not None:
            self._release(old)
        while len(self._free) < need:
            victim, entry = self._entries.popitem(last=False)
            self._release(entry)
            self.evictions += 1
            self._events.append((victim, False))
        pages = [self._free.pop() for _ in range(need)]
        pb = self.page_bytes
        for i, p in enumerate(pages):
            chunk = src[i * pb : (i + 1) * pb]
            self._arena[p * pb : p * pb + len(chunk)] = chunk
        self._entries[key] = (pages, n)
        self.nbytes += n
        self.admitted += 1
        if old is None:
            self._events.append((key, True))
        return True

    def _release(self, entry: tuple[list[int], int]) -> None:
        pages, n = entry
        self._free.extend(pages)
        self.nbytes -= n

    def drop(self, key: bytes) -> None:
        """Forget a chunk that failed verification: it is never served again."""
        with self._lock:
            entry = self._entries.pop(key, None)
            if entry is not None:
                self._release(entry)
                self.corrupt += 1
                self._events.append((key, False))

    def __contains__(self, key: bytes) -> bool:
        with self._lock:
            return key in self._entries

    def view(self, key: bytes) -> list[np.ndarray]:
        """The stored bytes of ``key`` as writable views of the arena, page by page (tests, inspection)."""
        with self._lock:
            pages, n = self._entries[key]
            pb = self.page_bytes
            return [self._arena[p * pb : p * pb + min(pb, n - i * pb)] for i, p in enumerate(pages)]

    def drain_events(self) -> list[tuple[bytes, bool]]:
        """Key-set changes since the last call, in order: (key, True) admitted, (key, False) gone."""
        with self._lock:
            events, self._events = self._events, []
            return events

    def stats(self) -> dict:
        with self._lock:
            return {"capacity_bytes": self.capacity, "bytes": self.nbytes, "chunks": len(self._entries),
                    "used_bytes": (self.num_pages - len(self._free)) * self.page_bytes, "hits": self.hits,
                    "misses": self.misses, "evictions": self.evictions, "admitted": self.admitted,
                    "corrupt": self.corrupt}
