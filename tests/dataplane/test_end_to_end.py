"""Fetching cached prefixes end to end on tiny-random, in every fetch mode, and through failures.

Every test compares against ``recompute``: with a lossless codec the greedy tokens must be identical,
whatever happened to the store, the chunks or the data plane on the way.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time

import pytest

from shadowserve.config import CodecConfig, DataPlaneConfig, EngineConfig
from shadowserve.engine.engine import LLMEngine
from shadowserve.engine.request import RequestStatus, SamplingParams
from shadowserve.llm import create_engine

LOSSLESS = CodecConfig(quant="none", lossless="zstd")
GREEDY = SamplingParams(max_tokens=8, ignore_eos=True)
CHUNK = 32


def prompts(n: int, seed: int, shared_prefix: int = 200, suffix: int = 9) -> list[list[int]]:
    rng = random.Random(seed)
    doc = [rng.randrange(3, 259) for _ in range(shared_prefix)]
    return [doc + [rng.randrange(3, 259) for _ in range(suffix)] for _ in range(n)]


def engine(tiny, store_url: str | None, mode: str, codec: CodecConfig = LOSSLESS, **plane) -> LLMEngine:
    # These tests are about the fetch path, not the cost policy: on tiny-random computing a prefix is
    # about as cheap as fetching it, so "auto" could skip the fetches they check.
    plane.setdefault("fetch_policy", "always")
    cfg = DataPlaneConfig(fetch_mode=mode, chunk_size=CHUNK, heartbeat_interval=0.2, heartbeat_timeout=3.0, **plane)
    return create_engine(EngineConfig(model="tiny-random", kv_cache_memory="16MiB"), loaded=tiny,
                         dataplane=cfg, store_url=store_url, codec=codec)


def run(eng: LLMEngine, ps, params=GREEDY):
    reqs = [eng.add_request(p, params) for p in ps]
    deadline = time.monotonic() + 120
    while eng.has_unfinished():
        assert time.monotonic() < deadline, "requests hung"
        eng.step()
    return reqs


def wait_ready(eng: LLMEngine, timeout: float = 60.0) -> None:
    """Step until a restarted data plane can take work again (a restart does not wait for it)."""
    deadline = time.monotonic() + timeout
    while not eng.kv_manager.backend.ready():
        assert time.monotonic() < deadline, "the restarted data plane never became ready"
        eng.step()
        time.sleep(0.01)


@pytest.fixture(scope="module")
def reference(tiny):
    """Greedy outputs without any remote cache, keyed by prompt."""
    eng = engine(tiny, None, "recompute")
    cache: dict[tuple, list[int]] = {}

    def outputs(ps):
        todo = [p for p in ps if tuple(p) not in cache]
        for p, r in zip(todo, run(eng, todo)):
            cache[tuple(p)] = r.output_token_ids
        return [cache[tuple(p)] for p in ps]

    return outputs


def warm_store(tiny, url: str, ps) -> None:
    cold = engine(tiny, url, "thread")
    run(cold, ps)
    cold.flush()
    assert cold.kv_manager.stats.saved_chunks >= len(ps[0]) // CHUNK
    cold.close()


@pytest.mark.parametrize("mode", ["sync", "thread", "offload"])
def test_fetched_prefix_gives_identical_tokens(tiny, reference, tmp_path, mode):
    url = f"file://{tmp_path}/store"
    ps = prompts(3, seed=1)
    warm_store(tiny, url, ps[:1])
    eng = engine(tiny, url, mode)
    reqs = run(eng, ps)
    assert [r.output_token_ids for r in reqs] == reference(ps)
    # Six whole chunks of the 200-token document, fetched once by whichever lookup answered first.
    assert sorted(r.num_fetched_tokens for r in reqs) == [0, 0, 192], eng.kv_manager.stats
    # TTFT breakdown: the one request that fetched knows for how long, and the fetch ended before its
    # first token; the two that reused its blocks never fetched.
    fetcher = max(reqs, key=lambda r: r.num_fetched_tokens)
    assert fetcher.arrival_time < fetcher.fetch_start_time < fetcher.fetch_end_time < fetcher.first_token_time
    assert fetcher.fetch_seconds > 0
    assert eng.output_of(fetcher).fetch_ms == pytest.approx(fetcher.fetch_seconds * 1e3)
    assert [eng.output_of(r).fetch_ms for r in reqs if r is not fetcher] == [None, None]
    stats = eng.kv_manager.stats
    assert stats.fetches == 1  # the other two reuse the landed blocks instead of fetching again
    assert stats.fetch_failures == 0 and stats.prefix_hit_tokens >= 192
    eng.flush()
    occupancy = eng.kv_manager.backend.stats().get("buffer_in_use", {})
    assert all(v == 0 for v in occupancy.values())
    eng.close()


def test_chunks_saved_through_another_lossless_stage_are_fetched(tiny, reference, tmp_path):
    """The store was filled with zstd chunks; an engine that would save with lz4 still fetches them."""
    url = f"file://{tmp_path}/store"
    ps = prompts(1, seed=6)
    warm_store(tiny, url, ps)
    eng = engine(tiny, url, "offload", codec=CodecConfig(quant="none", lossless="lz4"))
    reqs = run(eng, ps)
    assert [r.output_token_ids for r in reqs] == reference(ps)
    assert reqs[0].num_fetched_tokens == 192 and eng.kv_manager.stats.fetch_failures == 0
    eng.close()


def test_corrupt_chunk_falls_back_to_recompute(tiny, reference, tmp_path):
    url = f"file://{tmp_path}/store"
    ps = prompts(1, seed=2)
    warm_store(tiny, url, ps)
    files = sorted((tmp_path / "store").rglob("*"), key=lambda p: p.stat().st_mtime)
    victims = [f for f in files if f.is_file()]
    assert victims
    for f in victims:  # flip a byte in the middle of every stored chunk
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 0xFF
        f.write_bytes(bytes(data))
    eng = engine(tiny, url, "thread")
    reqs = run(eng, ps)
    assert [r.output_token_ids for r in reqs] == reference(ps)
    assert reqs[0].num_fetched_tokens == 0 and eng.kv_manager.stats.fetch_failures == 1
    assert reqs[0].fetch_seconds > 0  # a failed fetch still counts in the TTFT breakdown
    assert eng.kv_manager.stats.store_errors.get("corrupt", 0) >= 1  # /metrics: store_errors_total{kind="corrupt"}
    assert eng.kv_manager.store_health.up is True  # a corrupt chunk is not an unreachable store
    eng.flush()
    eng.close()
    # The recompute saved good chunks over the corrupt ones: the next engine fetches them.
    healed = engine(tiny, url, "thread")
    again = run(healed, ps)
    assert again[0].output_token_ids == reference(ps)[0] and again[0].num_fetched_tokens == 192
    healed.close()


def test_chunk_deleted_between_lookup_and_fetch(tiny, reference, tmp_path):
    url = f"file://{tmp_path}/store"
    ps = prompts(1, seed=3)
    warm_store(tiny, url, ps)
    eng = engine(tiny, url, "offload")

    class Liar:
        """Answers lookups as if everything were stored, like a store that evicts right after."""

        def longest_prefix(self, keys):
            return len(keys)

    real_keys = eng.kv_manager.key_fn
    eng.kv_manager.store = Liar()
    # Chunk 3 onwards never existed under these keys: the fetch lands chunks 0-2 only.
    eng.kv_manager.key_fn = lambda ids, salt=None: real_keys(ids, salt)[:3] + [b"gone-%d" % i + b"\0" * 9
                                                                               for i in range(3)]
    reqs = run(eng, ps)
    assert [r.output_token_ids for r in reqs] == reference(ps)
    assert reqs[0].num_fetched_tokens == 3 * CHUNK
    assert eng.kv_manager.stats.fetch_failures == 1
    assert eng.kv_manager.stats.store_errors == {"missing": 1}
    eng.close()


def test_kill_dataplane_mid_fetch(tiny, reference, tmp_path):
    url = f"file://{tmp_path}/store"
    ps = prompts(1, seed=4, shared_prefix=900)
    warm_store(tiny, url, ps)
    eng = engine(tiny, url + "?bandwidth=5mbit", "offload")  # slow link: the fetch takes over a second
    backend = eng.kv_manager.backend
    old_pid = backend.process.pid
    req = eng.add_request(ps[0], GREEDY)
    while req.status != RequestStatus.FETCHING:
        eng.step()
    time.sleep(0.2)
    os.kill(old_pid, signal.SIGKILL)
    while eng.has_unfinished():
        eng.step()
    assert req.output_token_ids == reference(ps)[0]
    assert eng.kv_manager.stats.dataplane_restarts == 1
    assert backend.healthy() and backend.process.pid != old_pid
    # The engine keeps serving (over this slow link the policy may rightly compute the next prefix;
    # test_a_restart_does_not_stall_the_engine checks that fetching resumes).
    wait_ready(eng)
    again = run(eng, prompts(1, seed=4, shared_prefix=900, suffix=5))
    assert again[0].output_token_ids == reference(prompts(1, seed=4, shared_prefix=900, suffix=5))[0]
    eng.flush()
    time.sleep(0.5)
    backend.poll()
    assert all(v == 0 for v in backend.stats().get("buffer_in_use", {}).values())
    eng.close()


def test_a_restart_does_not_stall_the_engine(tiny, reference, tmp_path):
    """A new data-plane interpreter takes 1-3 s to start. The engine must not wait for it: the step
    that restarts the plane returns at once, requests that arrive meanwhile compute their prefixes
    (same tokens), and fetching resumes once the new process is ready."""
    url = f"file://{tmp_path}/store"
    ps = prompts(2, seed=6, shared_prefix=256)
    later = prompts(1, seed=7, shared_prefix=256)  # stored, never computed by this engine
    warm_store(tiny, url, ps[:1] + later)
    eng = engine(tiny, url, "offload", fetch_policy="always")
    backend = eng.kv_manager.backend
    expected = reference(ps[1:])[0]
    stop = threading.Event()

    def watch():  # /health's and /metrics' threads ask too, while the engine's thread polls the pipe
        while not stop.is_set():
            backend.healthy() and backend.ready()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    os.kill(backend.process.pid, signal.SIGKILL)
    backend.process._child.proc.wait(timeout=10)
    req = eng.add_request(ps[1], GREEDY)  # its fetch goes to the dead plane, which the next poll notices
    deadline = time.monotonic() + 60
    while eng.kv_manager.stats.dataplane_restarts == 0:
        assert time.monotonic() < deadline, "the dead data plane was never restarted"
        eng.step()
    assert not backend.ready(), "the restart waited for the new process"
    run(eng, [])
    assert req.output_token_ids == expected and req.num_fetched_tokens == 0  # computed instead
    assert eng.kv_manager.stats.skipped_while_restarting >= 1 or backend.ready()  # its save, dropped
    wait_ready(eng)
    after = run(eng, later)
    stop.set()
    watcher.join(timeout=10)
    assert [r.output_token_ids for r in after] == reference(later) and after[0].num_fetched_tokens > 0
    assert eng.kv_manager.stats.fetch_failures == 1  # only the fetch the kill cut; no completion went astray
    eng.close()


def test_store_server_stopped_mid_fetch(tiny, reference):
    from shadowserve.store.launch import start_store_server

    server = start_store_server()
    try:
        ps = prompts(1, seed=5, shared_prefix=900)
        warm_store(tiny, server.url, ps)
        eng = engine(tiny, server.url + "?bandwidth=5mbit", "thread")
        req = eng.add_request(ps[0], GREEDY)
        while req.status != RequestStatus.FETCHING:
            eng.step()
        time.sleep(0.2)
        server.stop()
        while eng.has_unfinished():
            eng.step()
        assert req.output_token_ids == reference(ps)[0]
        # With the store gone, new requests still complete (lookups answer 0, saves fail quietly).
        other = prompts(1, seed=6)
        assert run(eng, other)[0].output_token_ids == reference(other)[0]
        assert eng.kv_manager.store_health.up is False and eng.kv_manager.stats.store_errors["unreachable"] >= 1
        assert "unreachable" in eng.kv_manager.store_health.reason()
        eng.close()
    finally:
        server.stop()


def test_fetch_timeout_abandons_and_recomputes(tiny, reference, tmp_path):
    url = f"file://{tmp_path}/store"
    ps = prompts(1, seed=7, shared_prefix=900)
    warm_store(tiny, url, ps)
    eng = engine(tiny, url + "?bandwidth=5mbit", "thread", fetch_timeout=0.3)
    reqs = run(eng, ps)
    assert reqs[0].output_token_ids == reference(ps)[0]
    assert eng.kv_manager.stats.fetch_failures == 1 and reqs[0].num_fetched_tokens == 0
    assert eng.kv_manager.stats.store_errors.get("timeout") == 1
    eng.flush(timeout=30)
    assert not eng.kv_manager.busy  # the late completion released the quarantined blocks
    bm = eng.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    eng.close()


def test_offload_refuses_an_in_process_store(tiny):
    from shadowserve.errors import ConfigError

    with pytest.raises(ConfigError, match="memory://"):
        engine(tiny, "memory://x", "offload")


@pytest.mark.parametrize("mode", ["sync", "thread", "offload"])
def test_close_releases_the_kv_pool(tiny, tmp_path, mode):
    """Closing an engine must free its KV pool at once, not whenever a reference cycle is collected."""
    import weakref

    eng = engine(tiny, f"file://{tmp_path}/store", mode)
    pool = weakref.ref(eng.kv_pool.tensor)
    eng.close()
    assert pool() is None


def test_engines_built_one_after_another_get_the_same_core_split(tiny, tmp_path):
    """A pinned engine unpins its process on close, so the next engine (another fetch mode in a
    benchmark) splits the same cores: its data plane never lands on the engine's cores."""
    url = f"file://{tmp_path}/store"
    before = os.sched_getaffinity(0)
    splits = []
    for mode in ("thread", "offload", "thread"):
        eng = engine(tiny, url, mode, pin_cores=True)
        splits.append((sorted(os.sched_getaffinity(0)), list(eng.dataplane_cores)))
        eng.close()
        assert os.sched_getaffinity(0) == before
    assert splits[0] == splits[1] == splits[2]
    if len(before) > 1:
        engine_cores, plane_cores = splits[0]
        assert not set(engine_cores) & set(plane_cores)


def _thread_affinities() -> list[set[int]]:
    """The CPUs each thread of this process may run on (Linux: /proc/self/task/*/status)."""
    out = []
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/status") as f:
                line = next(ln for ln in f if ln.startswith("Cpus_allowed_list:"))
        except (OSError, StopIteration):
            continue
        cores: set[int] = set()
        for part in line.split(":", 1)[1].strip().split(","):
            lo, _, hi = part.partition("-")
            cores.update(range(int(lo), int(hi or lo) + 1))
        out.append(cores)
    return out


@pytest.mark.parametrize("placement", ["reserved", "engine"])
def test_baseline_placement_decides_where_the_thread_pipeline_runs(tiny, reference, tmp_path, placement):
    """``baseline_cores=engine`` puts the thread baseline's pipeline on the engine's cores (the reserved
    ones idle: the paper's CacheGen-Async placement); ``reserved`` on the data-plane cores. Same answers."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs two cores to reserve one")
    url = f"file://{tmp_path}/store"
    ps = prompts(1, seed=11)
    warm_store(tiny, url, ps)
    eng = engine(tiny, url, "thread", pin_cores=True, baseline_cores=placement)
    try:
        engine_cores = set(os.sched_getaffinity(0))
        plane_cores = set(eng.dataplane_cores)
        reqs = run(eng, ps)
        assert [r.output_token_ids for r in reqs] == reference(ps) and reqs[0].num_fetched_tokens > 0
        on_plane = [a for a in _thread_affinities() if a <= plane_cores]
        if placement == "engine":
            assert set(eng.kv_manager.backend.spec.cores) == engine_cores
            assert not on_plane  # nothing of this process runs on the reserved cores
        else:
            assert set(eng.kv_manager.backend.spec.cores) == plane_cores
            assert on_plane  # the pipeline's threads are pinned there
    finally:
        eng.close()
