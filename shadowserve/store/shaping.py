"""Link emulation: a token bucket that paces received bytes, and a wrapper for any store.

``?bandwidth=10gbit&latency=0.2ms`` on a store URL makes one :class:`LinkShape` per opened
store; every connection of that store draws from the same bucket, like a NIC shared by all
flows. The ``shadowserve://`` client paces inside its receive loop (so the server really is
back-pressured by TCP); other backends are paced after each value arrives (:class:`ShapedStore`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from shadowserve.values import parse_duration, parse_rate


class TokenBucket:
    """Thread-safe pacer whose long-run rate is exact, shared by every connection of a store.

    It keeps a virtual clock: the time at which the bytes paid for so far would have crossed
    the link. ``begin()`` marks the start of a response, so an idle link banks only a short
    burst (0.5 ms of traffic, like tbf's) and a lone chunk takes about ``size / rate``. Within a transfer the clock may trail real time by up
    to ``max_lag`` (as a real link keeps filling the receive buffer while the reader is busy),
    so sleep overshoot and receiver hiccups are made up instead of lowering the rate.
    """

    def __init__(self, rate: float, max_lag: float = 0.05, burst_s: float = 0.0005) -> None:
        if rate <= 0:
            raise ValueError("rate must be > 0")
        self.rate = float(rate)
        self.max_lag = max_lag
        self.burst_s = burst_s
        self._clock = time.monotonic()
        self._lock = threading.Lock()

    def begin(self) -> None:
        """A response starts now: an idle link banks at most ``burst_s`` of credit (like tbf's burst)."""
        with self._lock:
            self._clock = max(self._clock, time.monotonic() - self.burst_s)

    def consume(self, n: int) -> None:
        """Pay for ``n`` received bytes, sleeping until the link would have delivered them."""
        with self._lock:
            now = time.monotonic()
            self._clock = max(self._clock, now - self.max_lag) + n / self.rate
            wait = self._clock - now
        if wait > 0:
            time.sleep(wait)

    def chunk_size(self) -> int:
        """How many bytes to receive between pacing decisions (about 1 ms of traffic)."""
        return int(min(max(self.rate * 0.001, 16 << 10), 1 << 20))


@dataclass(frozen=True)
class LinkShape:
    """Bandwidth (bytes/s, or None for unlimited) and one-way request latency (seconds)."""

    bandwidth: float | None = None
    latency: float = 0.0

    @classmethod
    def from_options(cls, bandwidth: str | float | None, latency: str | float | None) -> LinkShape:
        return cls(
            bandwidth=parse_rate(bandwidth) if bandwidth not in (None, "") else None,
            latency=parse_duration(latency) if latency not in (None, "") else 0.0,
        )

    @property
    def active(self) -> bool:
        return self.bandwidth is not None or self.latency > 0

    def bucket(self) -> TokenBucket | None:
        return TokenBucket(self.bandwidth) if self.bandwidth is not None else None


def wait_latency(start: float, latency: float) -> None:
    """Sleep until ``start + latency`` (the first byte cannot arrive earlier on the link)."""
    if latency > 0:
        left = start + latency - time.monotonic()
        if left > 0:
            time.sleep(left)


class ShapedStore:
    """Wraps any store so its reads see the link: latency per request, bandwidth per byte."""

    def __init__(self, inner: Any, shape: LinkShape) -> None:
        self.inner = inner
        self.shape = shape
        self._bucket = shape.bucket()

    def _pace(self, start: float, nbytes: int) -> None:
        """Hold the result back until the emulated link would have delivered it."""
        wait_latency(start, self.shape.latency)
        if self._bucket is not None and nbytes:
            self._bucket.consume(nbytes)

    def _begin(self) -> float:
        if self._bucket is not None:
            self._bucket.begin()
        return time.monotonic()

    def put(self, key: bytes, data: bytes | memoryview) -> None:
        self.inner.put(key, data)

    def get(self, key: bytes) -> bytes | None:
        start = self._begin()
        value = self.inner.get(key)
        self._pace(start, len(value) if value is not None else 0)
        return value

    def get_into(self, key: bytes, buffer: Any) -> int | None:
        start = self._begin()
        n = self.inner.get_into(key, buffer)
        self._pace(start, n or 0)
        return n

    def get_many_into(self, keys: Sequence[bytes], buffers: Sequence[Any]) -> list[int | None]:
        start = self._begin()
        sizes = self.inner.get_many_into(keys, buffers)
        self._pace(start, sum(n or 0 for n in sizes))
        return sizes

    def contains(self, keys: Sequence[bytes]) -> list[bool]:
        start = time.monotonic()
        result = self.inner.contains(keys)
        self._pace(start, 0)
        return result

    def longest_prefix(self, keys: Sequence[bytes]) -> int:
        start = time.monotonic()
        result = self.inner.longest_prefix(keys)
        self._pace(start, 0)
        return result

    def stats(self) -> dict[str, Any]:
        return self.inner.stats()

    def close(self) -> None:
        self.inner.close()

    def __enter__(self) -> ShapedStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
