"""``shadowserve store``: run the store server, or ask any store URL for stats / a ping."""

from __future__ import annotations

import argparse
import json
import logging


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="store_command", metavar="ACTION", required=True)
    serve = sub.add_parser("serve", help="run the shadowserve:// store server in the foreground")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    serve.add_argument("--port", type=int, default=7480, help="TCP port; 0 picks a free one")
    serve.add_argument("--capacity", default="8GiB", help="bytes kept before LRU eviction (e.g. 8GiB)")
    serve.add_argument("--max-value-size", default="512MiB", help="largest value a PUT may carry")
    serve.add_argument("--bandwidth", default=None, help="pace all sends to this rate (e.g. 10gbit)")
    serve.add_argument("--token-file", default=None, help="require AUTH with the token in this file")
    serve.add_argument("--max-connections", type=int, default=1024)
    serve.add_argument("--io-timeout", default="30s", help="drop a connection stuck mid-frame this long")
    serve.add_argument("--idle-timeout", default="600s", help="drop a connection idle between frames this long")
    for name, text in (("stats", "print a store's statistics as JSON"), ("ping", "check that a store answers")):
        p = sub.add_parser(name, help=text)
        p.add_argument("url", help="store URL, e.g. shadowserve://127.0.0.1:7480 or redis://127.0.0.1:6379/0")


def run(args: argparse.Namespace) -> int:
    if args.store_command == "serve":
        return _serve(args)
    from shadowserve.store import open_store
    from shadowserve.values import redact_url

    store = open_store(args.url)
    try:
        if args.store_command == "stats":
            print(json.dumps(store.stats(), indent=2, sort_keys=True))
        else:
            import time

            start = time.perf_counter()
            store.contains([b"\0" * 16])
            print(f"ok: {redact_url(args.url)} answered in {(time.perf_counter() - start) * 1e3:.2f} ms")
    finally:
        store.close()
    return 0


def _serve(args: argparse.Namespace) -> int:
    import signal
    import sys

    from shadowserve.config import StoreConfig
    from shadowserve.store.registry import read_token_file
    from shadowserve.store.server import StoreServer
    from shadowserve.values import parse_duration, parse_rate, parse_size

    config = StoreConfig(
        host=args.host, port=args.port, capacity=args.capacity, max_value_size=args.max_value_size,
        server_bandwidth=args.bandwidth, token_file=args.token_file, max_connections=args.max_connections,
    )
    if args.debug and not getattr(args, "log_level", None):
        logging.getLogger().setLevel(logging.DEBUG)
    server = StoreServer(
        host=config.host,
        port=config.port,
        capacity=parse_size(config.capacity),
        max_value_size=parse_size(config.max_value_size),
        token=read_token_file(config.token_file) if config.token_file else None,
        bandwidth=parse_rate(config.server_bandwidth) if config.server_bandwidth else None,
        max_connections=config.max_connections,
        io_timeout=parse_duration(args.io_timeout),
        idle_timeout=parse_duration(args.idle_timeout),
    )

    def stop(signum: int, frame: object) -> None:
        server.shutdown()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    auth = "token auth" if config.token_file else "no auth"
    print(f"shadowserve store listening on {server.host}:{server.port} "
          f"(capacity {config.capacity}, {auth})", flush=True)
    server.serve_forever()
    stats = server.stats()
    print(f"store stopped: {stats['keys']} keys, {stats['bytes']} bytes, {stats['connections_total']} connections",
          file=sys.stderr, flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m shadowserve.commands.store serve ...``: same as ``shadowserve store``, but
    without building the whole CLI (whose other subcommands may import heavy libraries), so a
    server starts in a fraction of a second."""
    import sys

    from shadowserve.errors import ShadowServeError

    parser = argparse.ArgumentParser(prog="shadowserve store")
    parser.add_argument("--debug", action="store_true")
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return run(args)
    except ShadowServeError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
