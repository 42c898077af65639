"""``open_store(url)``: a registry of URL schemes, one opener per backend.

URLs (query parameters apply to every scheme unless noted):

* ``memory://`` a private in-process store; ``memory://NAME`` one shared by name in-process.
  ``?capacity=1GiB`` turns on LRU eviction.
* ``file:///dir`` one file per key, written atomically (temp file + rename).
* ``shadowserve://host:port`` our store server; ``?token_file=F`` or ``?token=T`` for auth,
  ``?pool=N`` idle connections kept.
* ``redis://[user:password@]host:port/db`` and ``redis+cluster://[user:password@]host:port``
  (Redis/Valkey; user and password are an ACL user's, percent-encoded where needed). ``rediss://``
  and ``rediss+cluster://`` speak TLS: ``?ssl_ca_certs=FILE`` (the CA to trust; default the
  system's), ``ssl_certfile``/``ssl_keyfile`` (a client certificate), ``ssl_cert_reqs=required|
  optional|none``, ``ssl_check_hostname=true|false``.
* ``?timeout=30s&connect_timeout=5s`` for network backends.
* ``?bandwidth=10gbit&latency=0.2ms`` emulates a link on the receive path (see ``shaping``).

This module imports every backend (the redis client library itself loads only when a redis store
opens); the backends import only ``store/base.py``, so the arrows point one way. URLs in error
messages have their password and token masked (``config.redact_url``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any
from urllib.parse import SplitResult, parse_qsl, unquote, urlsplit

from shadowserve.config import StoreConfig
from shadowserve.errors import ConfigError
from shadowserve.store.client import StoreClient
from shadowserve.store.disk import FileStore
from shadowserve.store.memory import MemoryStore
from shadowserve.store.redis import RedisStore
from shadowserve.store.shaping import LinkShape, ShapedStore
from shadowserve.values import parse_duration, parse_size, redact_url

_COMMON_PARAMS = {"bandwidth", "latency"}
_NET_PARAMS = {"timeout", "connect_timeout"}
_TLS_FILES = {"ssl_ca_certs", "ssl_certfile", "ssl_keyfile"}
_TLS_PARAMS = _TLS_FILES | {"ssl_cert_reqs", "ssl_check_hostname"}

# scheme -> opener(parts of the URL, the URL as messages show it, its config) -> the store, link shaping applied
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
    shown = redact_url(config.url)  # what messages quote: never the password or token
    try:
        parts = urlsplit(config.url)
    except ValueError as exc:
        raise ConfigError(f"bad store url {shown!r}: {exc}") from None
    opener = _SCHEMES.get(parts.scheme.lower())
    if opener is None:
        raise ConfigError(
            f"unknown store url {shown!r}: use memory://, file:///dir, shadowserve://host:port, "
            "redis[s]://host:port/db or redis[s]+cluster://host:port"
        )
    return opener(parts, shown, config)


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


@register_scheme("redis", "rediss", "redis+cluster", "rediss+cluster")
def _open_redis(parts: SplitResult, url: str, config: StoreConfig) -> Any:
    scheme = parts.scheme.lower()
    tls = scheme.startswith("rediss")
    params = _params(parts.query, _NET_PARAMS | _TLS_PARAMS, url)
    if not tls and _TLS_PARAMS & set(params):
        raise ConfigError(f"ssl_* parameters need a TLS url (rediss:// or rediss+cluster://), got {url!r}")
    t, c = _net_timeouts(params, url, config)
    tls_options = _tls_options(params, url) if tls else None
    host, port = _host_port(parts, url, default_port=6379)
    db = 0
    if parts.path.strip("/"):
        try:
            db = int(parts.path.strip("/"))
        except ValueError as exc:
            raise ConfigError(f"redis database must be a number in {url!r}") from exc
    store = RedisStore(
        host, port, db=db, cluster=scheme.endswith("+cluster"),
        username=None if parts.username is None else unquote(parts.username),
        password=None if parts.password is None else unquote(parts.password),
        timeout=t, connect_timeout=c, tls=tls_options,
    )
    return _shaped(store, params, config)


def _tls_options(params: dict[str, str], url: str) -> dict[str, Any]:
    """redis-py's ssl_* keyword arguments from a rediss:// URL's query, checked before connecting."""
    options: dict[str, Any] = {}
    for name in sorted(_TLS_FILES & set(params)):
        if not os.path.isfile(params[name]):
            raise ConfigError(f"{name} file {params[name]!r} does not exist (in {url!r})")
        options[name] = params[name]
    if "ssl_cert_reqs" in params:
        if params["ssl_cert_reqs"] not in ("required", "optional", "none"):
            raise ConfigError(f"ssl_cert_reqs must be required, optional or none in {url!r}")
        options["ssl_cert_reqs"] = params["ssl_cert_reqs"]
    if "ssl_check_hostname" in params:
        flag = params["ssl_check_hostname"].lower()
        if flag not in ("true", "false", "1", "0", "yes", "no"):
            raise ConfigError(f"ssl_check_hostname must be true or false in {url!r}")
        options["ssl_check_hostname"] = flag in ("true", "1", "yes")
    return options


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
