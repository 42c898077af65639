"""Whether the shared store answers, as the control plane sees it, and what the operator is told.

Every lookup, fetch and save already talks to the store; their outcomes (and a small probe while no
request does) decide ``up``. Each change of state is logged once, write failures at most once per
``WRITE_LOG_INTERVAL`` seconds with a count of the ones not logged, so a store that vanishes under load
leaves a readable trace instead of one line per chunk. Errors are counted by kind for ``/metrics``.
"""

from __future__ import annotations

import logging
import threading
import time

from shadowserve.values import redact_url

log = logging.getLogger("shadowserve.store")
WRITE_LOG_INTERVAL = 30.0  # seconds between "rejects writes" lines
ERROR_KINDS = ("unreachable", "missing", "corrupt", "rejected", "timeout", "other")


def public_url(url: str) -> str:
    """``url`` without its query (token files, link emulation) and with any password masked."""
    return redact_url(url.split("?", 1)[0])


class StoreHealth:
    """Up/down state of one store, fed by the control plane's own calls (engine thread and lookup pool)."""

    def __init__(self, url: str, probe_interval: float = 5.0) -> None:
        self.url = public_url(url)
        self.probe_interval = probe_interval
        self.up: bool | None = None  # None until the first answer or failure
        self.down_since: float | None = None
        self.last_error: str | None = None
        self.errors: dict[str, int] = {}  # a plain dict: ManagerStats is turned into JSON with asdict
        self._last_write_log = float("-inf")
        self._writes_not_logged = 0
        self._lock = threading.Lock()  # the engine thread and the lookup pool both report

    # ---- what happened ------------------------------------------------------------------------

    def answered(self) -> None:
        """The store answered a request (whatever the answer)."""
        with self._lock:
            self._answered()

    def _answered(self) -> None:
        if self.up is False:
            gone = time.monotonic() - (self.down_since or time.monotonic())
            log.warning("store %s is reachable again after %.1f s; fetching and saving resume", self.url, gone)
        elif self.up is None:
            log.info("store %s is reachable", self.url)
        self.up, self.down_since, self.last_error = True, None, None

    def unreachable(self, error: str) -> None:
        """A call failed for a reason that says the store is not there (connection, timeout)."""
        with self._lock:
            self._unreachable(error)

    def _unreachable(self, error: str) -> None:
        self._count("unreachable", 1)
        self.last_error = error
        if self.up is not False:
            log.warning("store %s is unreachable (%s); requests compute their prefixes until it answers",
                        self.url, error)
            self.up, self.down_since = False, time.monotonic()

    def failed(self, kind: str, count: int = 1, error: str | None = None) -> None:
        """``count`` chunks failed with ``kind`` (see ERROR_KINDS); ``rejected`` ones are logged, rate-limited."""
        with self._lock:
            self._failed(kind, count, error)

    def _failed(self, kind: str, count: int, error: str | None) -> None:
        if kind == "unreachable":
            self._unreachable(error or "no answer")
            self._count("unreachable", count - 1)
            return
        self._count(kind if kind in ERROR_KINDS else "other", count)
        if kind != "rejected":
            return
        now = time.monotonic()
        if now - self._last_write_log < WRITE_LOG_INTERVAL:
            self._writes_not_logged += count
            return
        more = f" ({self._writes_not_logged} more since the last report)" if self._writes_not_logged else ""
        log.warning("store %s rejects writes: %d chunk(s) not saved%s: %s", self.url, count, more, error)
        self._last_write_log, self._writes_not_logged = now, 0

    def _count(self, kind: str, n: int) -> None:
        if n:
            self.errors[kind] = self.errors.get(kind, 0) + n

    # ---- what the operator sees ---------------------------------------------------------------

    def reason(self) -> str | None:
        """Why the store makes the server degraded, or None while it answers."""
        if self.up is not False:
            return None
        since = time.monotonic() - (self.down_since or time.monotonic())
        return f"store {self.url} unreachable for {since:.0f} s ({self.last_error}); prefixes are recomputed"
