"""``shadowserve bench store``: GET throughput of our store server vs Redis vs raw sockets,
and how exactly the emulated link delivers its requested rate.

All servers run as child processes on loopback; the client is this process, one thread,
receiving into one pre-allocated buffer (what the data plane does). Systems are measured in
turn inside each repetition, so background load hits them alike; the median is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
from typing import Any

_REQ = struct.Struct("<Q")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes", default="1MiB,4MiB", help="value sizes, comma separated")
    parser.add_argument("--duration", type=float, default=1.0, help="seconds per measurement")
    parser.add_argument("--repeat", type=int, default=3, help="repetitions (median reported)")
    parser.add_argument("--rates", default="1gbit,5gbit,10gbit", help="shaped link rates to check ('' to skip)")
    parser.add_argument("--shaped-duration", type=float, default=2.0, help="seconds per shaped-link measurement")
    parser.add_argument("--no-redis", action="store_true", help="skip Redis even if redis-server is installed")


# ---- raw-socket baseline -----------------------------------------------------------------------


def _raw_serve(port: int, max_size: int) -> None:
    """Baseline server: read an 8-byte length, send that many bytes with one sendall."""
    payload = memoryview(os.urandom(min(max_size, 1 << 20)) * (max_size // min(max_size, 1 << 20) + 1))
    listener = socket.create_server(("127.0.0.1", port))

    def handle(conn: socket.socket) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        req = bytearray(_REQ.size)
        with conn:
            while True:
                view, got = memoryview(req), 0
                while got < len(req):
                    n = conn.recv_into(view[got:])
                    if not n:
                        return
                    got += n
                conn.sendall(payload[: _REQ.unpack(req)[0]])

    while True:
        conn, _ = listener.accept()
        threading.Thread(target=handle, args=(conn,), daemon=True).start()


def _raw_get(sock: socket.socket, dest: memoryview, size: int) -> None:
    sock.sendall(_REQ.pack(size))
    view = dest[:size]
    while view:
        n = sock.recv_into(view)
        if not n:
            raise ConnectionError("raw server closed")
        view = view[n:]


# ---- measurement ----------------------------------------------------------------------------------


def _throughput(fetch: Any, size: int, duration: float) -> float:
    """Bytes per second of back-to-back ``fetch()`` calls for ``duration`` seconds."""
    for _ in range(3):
        fetch()  # warm: connection, TCP window
    n = 0
    start = time.perf_counter()
    deadline = start + duration
    while True:
        fetch()
        n += 1
        now = time.perf_counter()
        if now >= deadline:
            return n * size / (now - start)


def _fmt_rate(bps: float) -> str:
    return f"{bps / 1e9:6.2f} GB/s"


def run(args: argparse.Namespace) -> int:
    from shadowserve.config import parse_rate, parse_size
    from shadowserve.errors import ConfigError
    from shadowserve.store import open_store
    from shadowserve.store.launch import free_port, redis_available, start_redis, start_store_server, stop_pid

    sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    rates = [(r.strip(), parse_rate(r)) for r in args.rates.split(",") if r.strip()]
    if not sizes or args.duration <= 0 or args.repeat < 1:
        raise ConfigError("need at least one size, a positive --duration and --repeat >= 1")
    max_size = max(sizes)
    dest = memoryview(bytearray(max_size))
    keys_per_size = 8

    raw_port = free_port()
    raw_proc = subprocess.Popen(
        [sys.executable, "-m", "shadowserve.bench.store", "raw-server", str(raw_port), str(max_size)]
    )
    ours = start_store_server("--capacity", f"{2 * keys_per_size * sum(sizes) + (64 << 20)}")
    use_redis = not args.no_redis and redis_available()[0]
    redis = start_redis() if use_redis else None
    stores: dict[str, Any] = {}
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                raw_sock = socket.create_connection(("127.0.0.1", raw_port), timeout=30)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        raw_sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        raw_sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        stores["shadowserve"] = open_store(ours.url)
        if redis is not None:
            stores["redis"] = open_store(redis.url)
        values = {size: [os.urandom(size) for _ in range(keys_per_size)] for size in sizes}
        for store in stores.values():
            for size in sizes:
                for i, v in enumerate(values[size]):
                    store.put(f"bench-{size}-{i}".encode(), v)

        def fetcher(name: str, size: int) -> Any:
            if name == "raw":
                return lambda: _raw_get(raw_sock, dest, size)
            store = stores[name]
            keys = [f"bench-{size}-{i}".encode() for i in range(keys_per_size)]
            state = {"i": 0}

            def fetch() -> None:
                state["i"] = (state["i"] + 1) % keys_per_size
                if store.get_into(keys[state["i"]], dest) != size:
                    raise RuntimeError(f"{name} returned a wrong size")

            return fetch

        systems = ["raw", *stores]
        results: dict[int, dict[str, list[float]]] = {s: {n: [] for n in systems} for s in sizes}
        for _ in range(args.repeat):
            for size in sizes:
                for name in systems:
                    results[size][name].append(_throughput(fetcher(name, size), size, args.duration))

        loopback = []
        print(f"GET throughput over loopback, 1 client thread, median of {args.repeat} x {args.duration:g}s "
              f"(2 shared cores: expect noise)")
        header = f"{'value':>8} | {'raw recv_into':>13} | {'shadowserve':>11} | {'redis':>11} | ours/raw"
        print(header)
        print("-" * len(header))
        for size in sizes:
            med = {n: statistics.median(v) for n, v in results[size].items()}
            row = {
                "value_bytes": size,
                "raw_Bps": med["raw"],
                "shadowserve_Bps": med["shadowserve"],
                "redis_Bps": med.get("redis"),
                "ours_over_raw": med["shadowserve"] / med["raw"],
                "runs_Bps": results[size],
            }
            loopback.append(row)
            redis_txt = _fmt_rate(med["redis"]) if "redis" in med else "    skipped"
            print(f"{size / 2**20:>4.0f} MiB | {_fmt_rate(med['raw']):>13} | {_fmt_rate(med['shadowserve']):>11} | "
                  f"{redis_txt:>11} | {row['ours_over_raw']:7.1%}")

        shaped = []
        if rates:
            size = max_size
            print(f"\nShaped link: shadowserve://...?bandwidth=RATE, {size / 2**20:.0f} MiB values, "
                  f"{args.shaped_duration:g}s each")
            header = f"{'requested':>10} | {'delivered':>12} | {'error':>7}"
            print(header)
            print("-" * len(header))
            for text, rate in rates:
                store = open_store(f"{ours.url}?bandwidth={text}")
                try:
                    keys = [f"bench-{size}-{i}".encode() for i in range(keys_per_size)]
                    store.get_into(keys[0], dest)
                    time.sleep(0.05)  # let the bucket refill its burst: measure the steady rate
                    n, start = 0, time.perf_counter()
                    while time.perf_counter() - start < args.shaped_duration:
                        store.get_into(keys[n % keys_per_size], dest)
                        n += 1
                    got = n * size / (time.perf_counter() - start)
                finally:
                    store.close()
                err = got / rate - 1
                shaped.append({"requested": text, "requested_Bps": rate, "delivered_Bps": got, "error": err})
                print(f"{text:>10} | {got * 8 / 1e9:8.3f} Gbit | {err:+7.2%}")
        if args.json_path:
            with open(args.json_path, "w") as f:
                json.dump({"loopback": loopback, "shaped": shaped, "argv": sys.argv[1:]}, f, indent=2)
        return 0
    finally:
        for store in stores.values():
            store.close()
        ours.stop()
        if redis is not None:
            redis.stop()
        stop_pid(raw_proc)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "raw-server":
        _raw_serve(int(sys.argv[2]), int(sys.argv[3]))
