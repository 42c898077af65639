"""``shadowserve serve``: the OpenAI-compatible HTTP server on one engine (see shadowserve/server/)."""

from __future__ import annotations

import argparse
import os

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
    "kv_quality": ("codec", "kv_quality"),
    "quant": ("codec", "quant"),
    "lossless": ("codec", "lossless"),
    "host": ("server", "host"),
    "port": ("server", "port"),
    "api_key": ("server", "api_key"),
    "served_model_name": ("server", "served_model_name"),
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
    p.add_argument("--kv-quality", choices=list(QUALITY_LEVELS),
                   help="KV codec by quality level (default balanced; docs/results.md has each level's measured "
                        "ratio and accuracy); --quant/--lossless/--set codec.* override it field by field")
    p.add_argument("--quant", help="KV codec quantization: rms | cachegen | uniform | int8 | kivi | none")
    p.add_argument("--lossless", help="KV codec lossless stage: zstd | deflate | lz4 | none")
    p.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port to listen on (default 8000)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 requests")
    p.add_argument("--served-model-name", help="model name clients use (default: --model)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.SETTING=VALUE",
                   help="any other setting, e.g. --set engine.max_num_batched_tokens=8192 (repeatable)")


def settings_from_args(args: argparse.Namespace):
    from shadowserve.errors import ConfigError
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

    from shadowserve.llm import create_engine
    from shadowserve.server.openai_api import OpenAIServer

    settings = settings_from_args(args)
    engine = create_engine(settings.engine, progress=True, dataplane=settings.dataplane,
                           store_url=settings.store_url, codec=settings.codec)
    server = OpenAIServer(engine, settings.server)
    cfg = settings.server
    store = settings.store_url or "none"
    print(f"shadowserve: serving {server.model_name} on http://{cfg.host}:{cfg.port}  "
          f"(fetch mode {settings.dataplane.fetch_mode}, store {store})", flush=True)
    uvicorn.run(server.app, host=cfg.host, port=cfg.port, log_level=cfg.log_level, timeout_graceful_shutdown=5)
    return 0
