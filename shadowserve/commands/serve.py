"""``shadowserve serve``: the OpenAI-compatible HTTP server on one engine (see shadowserve/server/)."""

from __future__ import annotations

import argparse
import errno
import os
import socket

from shadowserve.cli import LOG_LEVELS, configure_logging
from shadowserve.errors import ConfigError
from shadowserve.kvcache.levels import QUALITY_LEVELS

# flag dest -> (section, setting); flags left out keep the YAML/env/default value.
FLAG_SETTINGS = {
    "model": ("engine", "model"),
    "dtype": ("engine", "dtype"),
    "kv_cache_memory": ("engine", "kv_cache_memory"),
    "max_num_seqs": ("engine", "max_num_seqs"),
    "max_model_len": ("engine", "max_model_len"),
    "store": ("store", "url"),
    "fetch_mode": ("dataplane", "fetch_mode"),
    "dataplane_cores": ("dataplane", "dataplane_cores"),
    "local_tier": ("dataplane", "local_tier"),
    "fetch_policy": ("dataplane", "fetch_policy"),
    "kv_quality": ("codec", "kv_quality"),
    "quant": ("codec", "quant"),
    "lossless": ("codec", "lossless"),
    "host": ("server", "host"),
    "port": ("server", "port"),
    "api_key": ("server", "api_key"),
    "served_model_name": ("server", "served_model_name"),
    "server_log_level": ("server", "log_level"),
}


def add_settings_arguments(p: argparse.ArgumentParser) -> None:
    """Flags shared by ``serve`` and ``config show``; all default to None so unset ones do not override."""
    p.add_argument("--config", metavar="FILE", help="YAML file with engine/store/dataplane/codec/server sections")
    p.add_argument("--model", help="model name or path (default smollm2-135m)")
    p.add_argument("--dtype", help="float32 | bfloat16 | float16")
    p.add_argument("--kv-cache-memory", help="KV pool size, e.g. 2GiB")
    p.add_argument("--max-num-seqs", type=int, help="most requests running at once")
    p.add_argument("--max-model-len", type=int, help="context limit (default: the model's)")
    p.add_argument("--store", help="KV store URL (shadowserve://host:port, redis://..., file:///dir)")
    p.add_argument("--fetch-mode", help="recompute | sync | thread | offload (default with a store: offload)")
    p.add_argument("--dataplane-cores", help="cores reserved for the data plane, e.g. 3 or 2-3 (default: auto)")
    p.add_argument("--local-tier", metavar="SIZE",
                   help="compressed host-memory tier of chunks in the data plane, e.g. 4GiB (default 0: off)")
    p.add_argument("--fetch-policy", choices=["auto", "always", "never"],
                   help="fetch cached chunks only when measured faster than computing them (auto, the default), "
                        "always, or never")
    p.add_argument("--kv-quality", choices=list(QUALITY_LEVELS),
                   help="KV codec by quality level (default balanced; docs/results.md has each level's measured "
                        "ratio and accuracy); --quant/--lossless/--set codec.* override it field by field")
    p.add_argument("--quant", help="KV codec quantization: rms | cachegen | uniform | int8 | kivi | none")
    p.add_argument("--lossless", help="KV codec lossless stage: zstd | deflate | lz4 | none")
    p.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port to listen on (default 8000)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 requests")
    p.add_argument("--served-model-name", help="model name clients use (default: --model)")
    p.add_argument("--log-level", dest="server_log_level", choices=LOG_LEVELS,
                   help="server, control-plane, data-plane and store log lines to stderr (default info)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.SETTING=VALUE",
                   help="any other setting, e.g. --set engine.max_num_batched_tokens=8192 (repeatable)")


def settings_from_args(args: argparse.Namespace):
    from shadowserve.settings import load_settings

    flags: dict[str, dict[str, object]] = {}
    for item in args.overrides:
        key, sep, value = item.partition("=")
        section, dot, name = key.partition(".")
        if not sep or not dot:
            raise ConfigError(f"--set expects SECTION.SETTING=VALUE, got {item!r}")
        flags.setdefault(section.strip(), {})[name.strip()] = value
    for dest, (section, name) in FLAG_SETTINGS.items():
        value = getattr(args, dest, None)
        if value is not None:
            flags.setdefault(section, {})[name] = value
    return load_settings(args.config, os.environ, flags)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_settings_arguments(p)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from shadowserve.controlplane.store_health import public_url
    from shadowserve.llm import create_engine
    from shadowserve.server.openai_api import OpenAIServer

    settings = settings_from_args(args)
    cfg = settings.server
    configure_logging(cfg.log_level)
    sock = bind_listener(cfg.host, cfg.port)  # a taken port fails now, not after the model has loaded
    try:
        engine = create_engine(settings.engine, progress=True, dataplane=settings.dataplane,
                               store_url=settings.store_url, codec=settings.codec)
        server = OpenAIServer(engine, settings.server)
        store = public_url(settings.store_url) if settings.store_url else "none"
        print(f"shadowserve: serving {server.model_name} on http://{cfg.host}:{cfg.port}  "
              f"(fetch mode {settings.dataplane.fetch_mode}, store {store})", flush=True)
        config = uvicorn.Config(server.app, log_level=cfg.log_level, timeout_graceful_shutdown=5)
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
    return 0


def bind_listener(host: str, port: int) -> socket.socket:
    """The server's listening socket, bound before anything slow starts; ConfigError if it cannot be."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        why = "is already in use" if exc.errno == errno.EADDRINUSE else f"cannot be bound ({exc.strerror})"
        raise ConfigError(f"{host}:{port} {why}: pick another --port or stop what listens there") from None
    sock.set_inheritable(True)
    return sock
