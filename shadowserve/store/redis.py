"""``redis://`` and ``redis+cluster://``: Redis or Valkey as the chunk store (redis-py + hiredis).

The cluster flavour is the scale-out path: keys spread over hash slots on many masters, and
redis-py's cluster pipeline groups a batch of GETs per node. Reads are pipelined; values
arrive as ``bytes`` from the parser and are copied once into the caller's buffer. ``rediss://``
(TLS) and an ACL user and password are redis-py's own options; messages never show the password.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from shadowserve.errors import StoreError, StoreUnavailable
from shadowserve.store.base import StoreBase, check_key, too_large, writable_view

_BATCH = 1024


def _flat(data: bytes | memoryview) -> memoryview:
    """A byte view redis-py sends as-is (no copy into a bytes object)."""
    try:
        view = memoryview(data)
        return view if view.format == "B" and view.ndim == 1 else view.cast("B")
    except TypeError as exc:
        raise StoreError(f"PUT data must be a contiguous buffer: {exc}") from exc


class RedisStore(StoreBase):
    """One redis-py client (thread-safe; it keeps its own connection pool)."""

    def __init__(
        self,
        host: str,
        port: int,
        db: int = 0,
        cluster: bool = False,
        username: str | None = None,
        password: str | None = None,
        timeout: float = 30.0,
        connect_timeout: float = 5.0,
        tls: dict[str, Any] | None = None,
    ) -> None:
        """``tls``: None for plain TCP, else redis-py's ``ssl_*`` options (an empty dict: system CAs)."""
        import redis
        import redis.cluster
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        self._errors: tuple[type[BaseException], ...] = (
            redis.exceptions.RedisError, redis.exceptions.RedisClusterException, OSError,
        )
        self.where = f"{'redis cluster' if cluster else 'redis'} at {host}:{port}"
        if tls is not None:
            self.where += " (TLS)"
        common = dict(
            host=host, port=port, username=username, password=password, socket_timeout=timeout,
            socket_connect_timeout=connect_timeout, ssl=tls is not None, **(tls or {}),
            # One immediate retry (a stale pooled connection), not redis-py's seconds of backoff:
            # a fetch that cannot be served soon is better recomputed.
            retry=Retry(NoBackoff(), 1),
        )
        try:
            if cluster:
                if db:
                    raise StoreError("redis cluster has only database 0")
                self._r: Any = redis.cluster.RedisCluster(**common)
            else:
                self._r = redis.Redis(db=db, **common)
                self._r.ping()
        except redis.exceptions.AuthenticationError as exc:
            who = f"user {username!r}" if username else "the default user"
            raise StoreError(f"{self.where} refused {who}: {exc} (the store URL carries the ACL user and "
                             "password: redis://user:password@host:port/db)") from exc
        except self._errors as exc:
            raise StoreError(f"cannot connect to {self.where}: {exc}") from exc
        self.cluster = cluster

    def _fail(self, what: str, exc: BaseException) -> StoreError:
        import redis  # optional dependency: loaded with the backend

        gone = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, redis.exceptions.ClusterDownError,
                OSError)
        kind = StoreUnavailable if isinstance(exc, gone) else StoreError  # the operator's "unreachable" vs the rest
        return kind(f"{what} on {self.where} failed: {exc}")

    def put(self, key: bytes, data: bytes | memoryview) -> None:
        key = check_key(key)
        try:
            self._r.set(key, data if isinstance(data, bytes) else _flat(data))
        except self._errors as exc:
            raise self._fail("SET", exc) from exc

    def get(self, key: bytes) -> bytes | None:
        try:
            return self._r.get(check_key(key))
        except self._errors as exc:
            raise self._fail("GET", exc) from exc

    def get_into(self, key: bytes, buffer: Any) -> int | None:
        return self.get_many_into([key], [buffer])[0]

    def _pipeline_get(self, keys: list[bytes]) -> list[bytes | None]:
        if len(keys) == 1:
            return [self._r.get(keys[0])]
        if not self.cluster:
            return self._r.mget(keys)  # one command, one round trip
        pipe = self._r.pipeline(transaction=False)
        for k in keys:
            pipe.get(k)
        return pipe.execute()

    def get_many_into(self, keys: Sequence[bytes], buffers: Sequence[Any]) -> list[int | None]:
        """Batched GETs (MGET, or a per-node pipeline on a cluster), copied into ``buffers``."""
        if len(keys) != len(buffers):
            raise StoreError(f"{len(keys)} keys but {len(buffers)} buffers")
        checked = [check_key(k) for k in keys]
        dests = [writable_view(b) for b in buffers]
        out: list[int | None] = []
        error: StoreError | None = None
        for lo in range(0, len(checked), _BATCH):
            batch = checked[lo : lo + _BATCH]
            try:
                values = self._pipeline_get(batch)
            except self._errors as exc:
                raise self._fail("GET", exc) from exc
            for key, value, dest in zip(batch, values, dests[lo : lo + _BATCH], strict=True):
                if value is None:
                    out.append(None)
                elif len(value) > len(dest):
                    out.append(None)
                    error = error or too_large(key, len(value), len(dest))
                else:
                    dest[: len(value)] = value
                    out.append(len(value))
        if error is not None:
            raise error
        return out

    def contains(self, keys: Sequence[bytes]) -> list[bool]:
        checked = [check_key(k) for k in keys]
        out: list[bool] = []
        try:
            for lo in range(0, len(checked), _BATCH):
                pipe = self._r.pipeline(transaction=False)
                for k in checked[lo : lo + _BATCH]:
                    pipe.exists(k)
                out.extend(bool(n) for n in pipe.execute())
        except self._errors as exc:
            raise self._fail("EXISTS", exc) from exc
        return out

    def stats(self) -> dict[str, Any]:
        try:
            if self.cluster:
                sizes = self._r.dbsize(target_nodes="primaries")
                keys = sum(int(v) for v in sizes.values()) if isinstance(sizes, dict) else int(sizes)
                return {"backend": "redis+cluster", "keys": keys, "nodes": len(self._r.get_primaries())}
            info = self._r.info("memory")
            return {"backend": "redis", "keys": int(self._r.dbsize()), "used_memory": info.get("used_memory")}
        except self._errors as exc:
            raise self._fail("INFO", exc) from exc

    def close(self) -> None:
        try:
            self._r.close()
        except self._errors:
            pass
