"""The ``KVStore`` contract every backend meets, and ``open_store(url)`` that picks one.

URLs (query parameters apply to every scheme unless noted):

* ``memory://`` a private in-process store; ``memory://NAME`` one shared by name in-process.
  ``?capacity=1GiB`` turns on LRU eviction.
* ``file:///dir`` one file per key, written atomically (temp file + rename).
* ``shadowserve://host:port`` our store server; ``?token_file=F`` or ``?token=T`` for auth,
  ``?pool=N`` idle connections kept.
* ``redis://[user:password@]host:port/db`` and ``redis+cluster://host:port`` (Redis/Valkey).
* ``?timeout=30s&connect_timeout=5s`` for network backends.
* ``?bandwidth=10gbit&latency=0.2ms`` emulates a link on the receive path (see ``shaping``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable
from urllib.parse import parse_qsl, urlsplit

from shadowserve.config import StoreConfig, parse_duration
from shadowserve.errors import ConfigError, StoreError

MAX_KEY_LEN = 1024


@runtime_checkable
class KVStore(Protocol):
    """A shared byte store for KV chunks keyed by chained chunk hashes."""

    def put(self, key: bytes, data: bytes | memoryview) -> None: ...
    def get(self, key: bytes) -> bytes | None: ...
    def get_into(self, key: bytes, buffer: Any) -> int | None: ...
    def get_many_into(self, keys: Sequence[bytes], buffers: Sequence[Any]) -> list[int | None]: ...
    def contains(self, keys: Sequence[bytes]) -> list[bool]: ...
    def longest_prefix(self, keys: Sequence[bytes]) -> int: ...
    def stats(self) -> dict[str, Any]: ...
    def close(self) -> None: ...


def check_key(key: Any) -> bytes:
    """Keys are non-empty bytes of at most ``MAX_KEY_LEN``; anything else is a caller bug."""
    if isinstance(key, (bytearray, memoryview)):
        key = bytes(key)
    if not isinstance(key, bytes):
        raise StoreError(f"store keys must be bytes, got {type(key).__name__}")
    if not 0 < len(key) <= MAX_KEY_LEN:
        raise StoreError(f"store keys must be 1..{MAX_KEY_LEN} bytes, got {len(key)}")
    return key


def writable_view(buffer: Any) -> memoryview:
    """A flat writable byte view of ``buffer`` (bytearray, numpy array, mmap, memoryview)."""
    try:
        view = memoryview(buffer)
    except TypeError as exc:
        raise StoreError(f"destination of type {type(buffer).__name__} is not a buffer") from exc
    if view.readonly:
        raise StoreError("destination buffer is read-only")
    if view.format != "B" or view.ndim != 1:
        if not view.contiguous:
            raise StoreError("destination buffer must be contiguous")
        view = view.cast("B")
    return view


class _TooLarge(StoreError):
    """A value does not fit its destination buffer (the store itself is fine)."""


def too_large(key: bytes, size: int, capacity: int) -> StoreError:
    return _TooLarge(f"value for key {key.hex()} is {size} bytes but the destination buffer holds {capacity}")


class StoreBase:
    """Shared behaviour: batched calls fall back to single ones, context-manager support."""

    def get_many_into(self, keys: Sequence[bytes], buffers: Sequence[Any]) -> list[int | None]:
        """Fetch each key into its buffer; backends that can pipeline override this.

        A value too large for its buffer does not stop the others: all are fetched, then the
        first such error is raised (the same behaviour as the pipelined backends).
        """
        if len(keys) != len(buffers):
            raise StoreError(f"{len(keys)} keys but {len(buffers)} buffers")
        out: list[int | None] = []
        error: StoreError | None = None
        for key, buffer in zip(keys, buffers, strict=True):
            try:
                out.append(self.get_into(key, buffer))  # type: ignore[attr-defined]
            except _TooLarge as exc:
                out.append(None)
                error = error or exc
        if error is not None:
            raise error
        return out

    def longest_prefix(self, keys: Sequence[bytes]) -> int:
        """How many leading chained keys are present (a gap ends the usable prefix)."""
        n = 0
        for present in self.contains(keys):  # type: ignore[attr-defined]
            if not present:
                break
            n += 1
        return n

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()  # type: ignore[attr-defined]


_COMMON_PARAMS = {"bandwidth", "latency"}
_NET_PARAMS = {"timeout", "connect_timeout"}


def _params(query: str, allowed: set[str], url: str) -> dict[str, str]:
    params = dict(parse_qsl(query, keep_blank_values=True))
    unknown = set(params) - allowed - _COMMON_PARAMS
    if unknown:
        raise ConfigError(f"unknown parameter(s) {', '.join(sorted(unknown))} in store url {url!r}")
    return params


def open_store(url: str | StoreConfig) -> Any:
    """Open the store a URL (or a ``StoreConfig``) names; see the module docstring for URLs."""
    config = url if isinstance(url, StoreConfig) else StoreConfig(url=url)
    url = config.url
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    timeout, connect_timeout = config.timeout, config.connect_timeout

    def net_timeouts(params: dict[str, str]) -> tuple[float, float]:
        t = parse_duration(params["timeout"]) if "timeout" in params else timeout
        c = parse_duration(params["connect_timeout"]) if "connect_timeout" in params else connect_timeout
        if t <= 0 or c <= 0:
            raise ConfigError(f"timeouts must be > 0 in {url!r}")
        return t, c

    if scheme == "memory":
        from shadowserve.config import parse_size
        from shadowserve.store.memory import MemoryStore

        params = _params(parts.query, {"capacity"}, url)
        capacity = parse_size(params["capacity"]) if "capacity" in params else None
        store: Any = MemoryStore.named(parts.netloc + parts.path, capacity)
    elif scheme == "file":
        from shadowserve.store.disk import FileStore

        params = _params(parts.query, set(), url)
        path = parts.netloc + parts.path
        if not path:
            raise ConfigError(f"file store url {url!r} has no directory (use file:///path/to/dir)")
        store = FileStore(path)
    elif scheme == "shadowserve":
        from shadowserve.store.client import StoreClient

        params = _params(parts.query, _NET_PARAMS | {"token", "token_file", "pool"}, url)
        t, c = net_timeouts(params)
        token = params.get("token")
        token_file = params.get("token_file", config.token_file)
        if token is None and token_file:
            token = read_token_file(token_file)
        host, port = _host_port(parts, url, default_port=7480)
        from shadowserve.store.shaping import LinkShape

        shape = LinkShape.from_options(
            params.get("bandwidth", config.bandwidth), params.get("latency", config.latency)
        )
        return StoreClient(
            host, port, token=token, timeout=t, connect_timeout=c, shape=shape,
            pool_size=int(params.get("pool", 16)),
        )
    elif scheme in ("redis", "redis+cluster", "rediss"):
        from shadowserve.store.redis import RedisStore

        params = _params(parts.query, _NET_PARAMS, url)
        t, c = net_timeouts(params)
        host, port = _host_port(parts, url, default_port=6379)
        db = 0
        if parts.path.strip("/"):
            try:
                db = int(parts.path.strip("/"))
            except ValueError as exc:
                raise ConfigError(f"redis database must be a number in {url!r}") from exc
        store = RedisStore(
            host, port, db=db, cluster=scheme == "redis+cluster", username=parts.username,
            password=parts.password, timeout=t, connect_timeout=c, ssl=scheme == "rediss",
        )
    else:
        raise ConfigError(
            f"unknown store url {url!r}: use memory://, file:///dir, shadowserve://host:port, "
            "redis://host:port/db or redis+cluster://host:port"
        )
    from shadowserve.store.shaping import LinkShape, ShapedStore

    shape = LinkShape.from_options(params.get("bandwidth", config.bandwidth), params.get("latency", config.latency))
    return ShapedStore(store, shape) if shape.active else store


def _host_port(parts: Any, url: str, default_port: int) -> tuple[str, int]:
    try:
        port = parts.port or default_port
    except ValueError as exc:
        raise ConfigError(f"bad port in store url {url!r}") from exc
    host = parts.hostname
    if not host:
        raise ConfigError(f"store url {url!r} has no host")
    return host, port


def read_token_file(path: str) -> str:
    """The shared auth token: the file's content without surrounding whitespace."""
    try:
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read token file {path!r}: {exc.strerror}") from exc
    if not token:
        raise ConfigError(f"token file {path!r} is empty")
    return token
