"""``shadowserve bench store``: GET throughput of our store server vs Redis vs raw sockets,
and how exactly the emulated link delivers its requested rate.

All servers run as child processes on loopback; the client is this process, one thread,
receiving into one pre-allocated buffer (what the data plane does). Requests to the systems
are interleaved one by one and timed individually, so background load on this shared machine
hits them alike; the median over rounds is reported.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import random
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
from typing import Any

from shadowserve.errors import ConfigError
from shadowserve.store import open_store
from shadowserve.store.launch import free_port, redis_available, start_redis, start_store_server, stop_pid
from shadowserve.store.netns import SERVER_ADDR, ShapedLink, netns_available
from shadowserve.values import parse_rate, parse_size

_REQ = struct.Struct("<QQ")  # value size, which of the server's buffers
_RAW_BUFFERS = 8  # as many distinct values as the stores serve, so no system gets a cache-hot source


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes", default="1MiB,4MiB", help="value sizes, comma separated")
    parser.add_argument("--duration", type=float, default=1.0, help="seconds per measurement")
    parser.add_argument("--repeat", type=int, default=3, help="repetitions (median reported)")
    parser.add_argument("--rates", default="1gbit,5gbit,10gbit", help="shaped link rates to check ('' to skip)")
    parser.add_argument("--shaped-duration", type=float, default=2.0, help="seconds per shaped-link measurement")
    parser.add_argument("--no-redis", action="store_true", help="skip Redis even if redis-server is installed")
    parser.add_argument("--netns", default="", metavar="RATES",
                        help="also measure a real tc-tbf veth link between network namespaces at these rates "
                             "(e.g. 1gbit,5gbit; needs root)")


_NETNS_CLIENT = r"""
import sys, time
from shadowserve.store import open_store
url, size, duration = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
store = open_store(url)
for _ in range(200):
    try:
        store.put(b"netns-bench-key!", b"n" * size); break
    except Exception:
        time.sleep(0.05)
buf = bytearray(size)
store.get_into(b"netns-bench-key!", buf)
n, start = 0, time.perf_counter()
while time.perf_counter() - start < duration:
    store.get_into(b"netns-bench-key!", buf); n += 1
print(n * size / (time.perf_counter() - start))
"""


def _netns_rates(rates: list[tuple[str, float]], size: int, duration: float) -> list[dict[str, Any]]:
    """GET throughput through a tbf-shaped veth link (server and client in their own namespaces)."""
    ok, why = netns_available()
    if not ok:
        print(f"\nnetns link skipped: {why}")
        return []
    print(f"\nReal shaped link: tc tbf on a veth pair between two network namespaces, {size / 2**20:.0f} MiB "
          f"values, {duration:g}s each")
    header = f"{'tbf rate':>10} | {'delivered':>20}"
    print(header)
    print("-" * len(header))
    rows = []
    for text, rate in rates:
        with ShapedLink(text) as link:
            link.popen_server([sys.executable, "-m", "shadowserve.cli", "store", "serve", "--host", SERVER_ADDR,
                               "--port", "7480"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            out = link.run_client([sys.executable, "-c", _NETNS_CLIENT, f"shadowserve://{SERVER_ADDR}:7480",
                                   str(size), str(duration)], capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            print(f"{text:>10} | failed: {out.stderr.strip()[-200:]}")
            continue
        got = float(out.stdout.strip().splitlines()[-1])
        rows.append({"rate": text, "rate_Bps": rate, "delivered_Bps": got, "error": got / rate - 1})
        print(f"{text:>10} | {got * 8 / 1e9:7.3f} Gbit {got / rate - 1:+7.2%}")
    return rows


# ---- raw-socket baseline -----------------------------------------------------------------------


def _raw_serve(port: int, max_size: int) -> None:
    """Baseline server: read (length, index), send that many bytes of buffer ``index`` with one sendall."""
    payloads = [memoryview(bytearray(os.urandom(max_size))) for _ in range(_RAW_BUFFERS)]
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
                size, index = _REQ.unpack(req)
                conn.sendall(payloads[index % _RAW_BUFFERS][:size])

    while True:
        conn, _ = listener.accept()
        threading.Thread(target=handle, args=(conn,), daemon=True).start()


def _raw_get(sock: socket.socket, dest: memoryview, size: int, index: int = 0) -> None:
    sock.sendall(_REQ.pack(size, index))
    view = dest[:size]
    while view:
        n = sock.recv_into(view)
        if not n:
            raise ConnectionError("raw server closed")
        view = view[n:]


# ---- measurement ----------------------------------------------------------------------------------


def _interleaved(fetchers: dict[str, Any], size: int, duration: float, rng: random.Random) -> dict[str, float]:
    """Bytes per second of each system, measured request by request in alternation.

    Every iteration fetches once from each system in shuffled order and times each call, so
    all systems share the same moments of background load (this machine is shared).
    """
    for fetch in fetchers.values():
        for _ in range(3):
            fetch()  # warm: connection, TCP window
    names = list(fetchers)
    spent = dict.fromkeys(names, 0.0)
    count = 0
    clock = time.perf_counter
    end = clock() + duration * len(names)
    while clock() < end:
        rng.shuffle(names)
        for name in names:
            t0 = clock()
            fetchers[name]()
            spent[name] += clock() - t0
        count += 1
    return {name: count * size / spent[name] for name in fetchers}


def _fmt_rate(bps: float) -> str:
    return f"{bps / 1e9:6.2f} GB/s"


def run(args: argparse.Namespace) -> int:
    sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    rates = [(r.strip(), parse_rate(r)) for r in args.rates.split(",") if r.strip()]
    if not sizes or args.duration <= 0 or args.repeat < 1:
        raise ConfigError("need at least one size, a positive --duration and --repeat >= 1")
    max_size = max(sizes)
    # Page-aligned like a shared-memory slot of the data plane. (A bytearray's data sits 16 bytes
    # into its first page; then how fast the kernel copies depends on where the value falls in
    # the TCP stream, which skews raw vs protocol-framed comparisons by up to ~1.5x.)
    dest = memoryview(mmap.mmap(-1, max_size))
    keys_per_size = 8

    raw_port = free_port()
    raw_proc = subprocess.Popen(
        [sys.executable, "-m", "shadowserve.bench.suites.store", "raw-server", str(raw_port), str(max_size)]
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
        raw_sock.settimeout(None)  # plain blocking socket: one system call per receive
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
                turn = {"i": 0}

                def raw_fetch() -> None:
                    turn["i"] = (turn["i"] + 1) % keys_per_size
                    _raw_get(raw_sock, dest, size, turn["i"])

                return raw_fetch
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
        rng = random.Random(0)
        for _ in range(args.repeat):
            for size in sizes:
                rates_now = _interleaved({n: fetcher(n, size) for n in systems}, size, args.duration, rng)
                for name, rate in rates_now.items():
                    results[size][name].append(rate)

        loopback = []
        print(f"GET throughput over loopback, 1 client thread into one pre-allocated buffer; median (best) of "
              f"{args.repeat} rounds of ~{args.duration:g}s per system, requests to the systems interleaved")
        header = (f"{'value':>7} | {'raw recv_into':>20} | {'shadowserve':>20} | {'redis':>20} | "
                  f"{'ours/raw':>8} | {'redis/raw':>9}")
        print(header)
        print("-" * len(header))
        for size in sizes:
            runs = results[size]
            med = {n: statistics.median(v) for n, v in runs.items()}
            best = {n: max(v) for n, v in runs.items()}
            # Ratios are taken per round (the systems shared that round's load), then the median.
            ratio = statistics.median(o / r for o, r in zip(runs["shadowserve"], runs["raw"], strict=True))
            redis_ratio = (statistics.median(o / r for o, r in zip(runs["redis"], runs["raw"], strict=True))
                           if "redis" in runs else None)
            row = {
                "value_bytes": size,
                "raw_Bps": med["raw"], "raw_best_Bps": best["raw"],
                "shadowserve_Bps": med["shadowserve"], "shadowserve_best_Bps": best["shadowserve"],
                "redis_Bps": med.get("redis"), "redis_best_Bps": best.get("redis"),
                "ours_over_raw": ratio, "redis_over_raw": redis_ratio,
                "runs_Bps": runs,
            }
            loopback.append(row)

            def cell(name: str, med: dict[str, float] = med, best: dict[str, float] = best) -> str:
                if name not in med:
                    return "skipped"
                return f"{med[name] / 1e9:.2f} ({best[name] / 1e9:.2f}) GB/s"

            print(f"{size / 2**20:>3.0f} MiB | {cell('raw'):>20} | {cell('shadowserve'):>20} | {cell('redis'):>20} | "
                  f"{ratio:8.1%} | {(f'{redis_ratio:.1%}' if redis_ratio else '-'):>9}")

        shaped = []
        if rates:
            size = max_size
            keys = [f"bench-{size}-{i}".encode() for i in range(keys_per_size)]
            batch_bufs = [bytearray(size) for _ in range(4)]
            print(f"\nShaped link: shadowserve://...?bandwidth=RATE, {size / 2**20:.0f} MiB values, "
                  f"{args.shaped_duration:g}s per cell; the link cannot beat the unshaped figure above")
            header = f"{'requested':>10} | {'get_into':>20} | {'get_many_into x4':>20}"
            print(header)
            print("-" * len(header))
            for text, rate in rates:
                store = open_store(f"{ours.url}?bandwidth={text}")
                row: dict[str, Any] = {"requested": text, "requested_Bps": rate}
                try:
                    for mode in ("get_into", "get_many_into"):
                        def one(i: int, mode: str = mode, store: Any = store) -> int:
                            if mode == "get_into":
                                store.get_into(keys[i % keys_per_size], dest)
                                return size
                            store.get_many_into([keys[(i + j) % keys_per_size] for j in range(4)], batch_bufs)
                            return 4 * size

                        one(0)
                        time.sleep(0.05)  # idle: the next call starts from a fresh link
                        moved, i, start = 0, 0, time.perf_counter()
                        while time.perf_counter() - start < args.shaped_duration:
                            moved += one(i)
                            i += 1
                        got = moved / (time.perf_counter() - start)
                        row[f"{mode}_Bps"] = got
                        row[f"{mode}_error"] = got / rate - 1
                finally:
                    store.close()
                shaped.append(row)
                print(f"{text:>10} | {row['get_into_Bps'] * 8 / 1e9:7.3f} Gbit {row['get_into_error']:+7.2%} | "
                      f"{row['get_many_into_Bps'] * 8 / 1e9:7.3f} Gbit {row['get_many_into_error']:+7.2%}")
        netns_rows = []
        if args.netns:
            netns_rows = _netns_rates([(r.strip(), parse_rate(r)) for r in args.netns.split(",") if r.strip()],
                                      max_size, args.shaped_duration)
        if args.json_path:
            with open(args.json_path, "w") as f:
                json.dump({"loopback": loopback, "shaped": shaped, "netns": netns_rows, "argv": sys.argv[1:]},
                          f, indent=2)
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
