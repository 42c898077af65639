"""``open_store(url)``: a registry of URL schemes, one opener per backend.

URLs (query parameters apply to every scheme unless noted):

* ``memory://`` a private in-process store; ``memory://NAME`` one shared by name in-process.
  ``?capacity=1GiB`` turns on LRU eviction.
* ``file:///dir`` one file per key, written atomically (temp file + rename).
* ``shadowserve://host:port`` our store server; ``?token_file=F`` or ``?token=T`` for auth,
  ``?pool=N`` idle connections kept.
* ``redis://[user:password@]host:port/db`` and ``redis+cluster://host:port`` (Redis/Valkey).
* ``?timeout=30s&connect_timeout=5s`` for network backends.
* ``?bandwidth=10gbit&latency=0.2ms`` emulates a link on the receive path (see ``shaping``).

This module imports every backend (the redis client library itself loads only when a redis store
opens); the backends import only ``store/base.py``, so the arrows point one way.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import SplitResult, parse_qsl, urlsplit

from shadowserve.config import StoreConfig, parse_duration, parse_size
from shadowserve.errors import ConfigError
from shadowserve.store.client import StoreClient
from shadowserve.store.disk import FileStore
from shadowserve.store.memory import MemoryStore
from shadowserve.store.redis import RedisStore
from shadowserve.store.shaping import LinkShape, ShapedStore

_COMMON_PARAMS = {"bandwidth", "latency"}
_NET_PARAMS = {"timeout", "connect_timeout"}

# scheme -> opener(parts of the URL, the URL, its config) -> the store, link shaping applied
Opener = Callable[[SplitResult, str, StoreConfig], Any]
_SCHEMES: dict[str, Opener] = {}


def register_scheme(*schemes: str) -> Callable[[Opener], Opener]:
    """Make ``open_store`` open URLs of ``schemes`` with the decorated opener."""

    def register(opener: Opener) -> Opener:
        for scheme in schemes:
            _SCHEMES[scheme] = opener
        return opener

    return register


def open_store(url: str | StoreConfig) -> Any:
    """Open the store a URL (or a ``StoreConfig``) names; see the module docstring for URLs."""
    config = url if isinstance(url, StoreConfig) else StoreConfig(url=url)
    url = config.url
    parts = urlsplit(url)
    opener = _SCHEMES.get(parts.scheme.lower())
    if opener is None:
        raise ConfigError(
            f"unknown store url {url!r}: use memory://, file:///dir, shadowserve://host:port, "
            "redis://host:port/db or redis+cluster://host:port"
        )
    return opener(parts, url, config)


def _shaped(store: Any, params: dict[str, str], config: StoreConfig) -> Any:
    shape = LinkShape.from_options(params.get("bandwidth", config.bandwidth), params.get("latency", config.latency))
    return ShapedStore(store, shape) if shape.active else store


def _net_timeouts(params: dict[str, str], url: str, config: StoreConfig) -> tuple[float, float]:
    t = parse_duration(params["timeout"]) if "timeout" in params else config.timeout
    c = parse_duration(params["connect_timeout"]) if "connect_timeout" in params else config.connect_timeout
    if t <= 0 or c <= 0:
        raise ConfigError(f"timeouts must be > 0 in {url!r}")
    return t, c


@register_scheme("memory")
def _open_memory(parts: SplitResult, url: str, config: StoreConfig) -> Any:
    params = _params(parts.query, {"capacity"}, url)
    capacity = parse_size(params["capacity"]) if "capacity" in params else None
    return _shaped(MemoryStore.named(parts.netloc + parts.path, capacity), params, config)


@register_scheme("file")
def _open_file(parts: SplitResult, url: str, config: StoreConfig) -> Any:
    params = _params(parts.query, set(), url)
    path = parts.netloc + parts.path
    if not path:
        raise ConfigError(f"file store url {url!r} has no directory (use file:///path/to/dir)")
    return _shaped(FileStore(path), params, config)


@register_scheme("shadowserve")
def _open_shadowserve(parts: SplitResult, url: str, config: StoreConfig) -> Any:
    params = _params(parts.query, _NET_PARAMS | {"token", "token_file", "pool"}, url)
    t, c = _net_timeouts(params, url, config)
    token = params.get("token")
    token_file = params.get("token_file", config.token_file)
    if token is None and token_file:
        token = read_token_file(token_file)
    host, port = _host_port(parts, url, default_port=7480)
    # The client shapes its own receive path (per connection), so no ShapedStore around it.
    shape = LinkShape.from_options(params.get("bandwidth", config.bandwidth), params.get("latency", config.latency))
    return StoreClient(
        host, port, token=token, timeout=t, connect_timeout=c, shape=shape,
        pool_size=int(params.get("pool", 16)),
    )


@register_scheme("redis", "redis+cluster", "rediss")
def _open_redis(parts: SplitResult, url: str, config: StoreConfig) -> Any:
    scheme = parts.scheme.lower()
    params = _params(parts.query, _NET_PARAMS, url)
    t, c = _net_timeouts(params, url, config)
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
    return _shaped(store, params, config)


def _params(query: str, allowed: set[str], url: str) -> dict[str, str]:
    params = dict(parse_qsl(query, keep_blank_values=True))
    unknown = set(params) - allowed - _COMMON_PARAMS
    if unknown:
        raise ConfigError(f"unknown parameter(s) {', '.join(sorted(unknown))} in store url {url!r}")
    return params


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
