"""The engine on tiny-random: batching, chunked prefill, prefix reuse, preemption, sampling, errors."""

from __future__ import annotations

import random

import pytest

from shadowserve.config import EngineConfig
from shadowserve.engine.engine import LLMEngine
from shadowserve.engine.request import RequestStatus, SamplingParams
from shadowserve.errors import ConfigError, ModelError


def make_engine(tiny, **overrides) -> LLMEngine:
    cfg = dict(model="tiny-random", kv_cache_memory="16MiB")
    cfg.update(overrides)
    return LLMEngine(EngineConfig(**cfg), loaded=tiny)


def run_all(engine: LLMEngine, prompts, params) -> list[list[int]]:
    reqs = [engine.add_request(p, params) for p in prompts]
    while engine.has_unfinished():
        engine.step()
    assert all(r.status == RequestStatus.FINISHED for r in reqs)
    return [r.output_token_ids for r in reqs]


def prompts(n: int, seed: int = 0, lo: int = 5, hi: int = 120) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 259) for _ in range(rng.randrange(lo, hi))] for _ in range(n)]


GREEDY = SamplingParams(max_tokens=20, ignore_eos=True)


def test_batched_equals_sequential(tiny):
    ps = prompts(6)
    engine = make_engine(tiny, enable_prefix_caching=False)
    sequential = [run_all(engine, [p], GREEDY)[0] for p in ps]
    assert run_all(engine, ps, GREEDY) == sequential
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_requests_join_a_running_batch(tiny):
    engine = make_engine(tiny, enable_prefix_caching=False)
    ps = prompts(4, seed=1)
    expected = [run_all(engine, [p], GREEDY)[0] for p in ps]
    reqs = [engine.add_request(ps[0], GREEDY)]
    steps = 0
    while engine.has_unfinished():
        engine.step()
        steps += 1
        if steps in (2, 4, 6):  # arrive while others decode
            reqs.append(engine.add_request(ps[len(reqs)], GREEDY))
    assert [r.output_token_ids for r in reqs] == expected


def test_chunked_prefill_gives_same_tokens(tiny):
    ps = prompts(3, seed=2, lo=150, hi=400)
    whole = run_all(make_engine(tiny, enable_prefix_caching=False), ps, GREEDY)
    chunked = run_all(make_engine(tiny, enable_prefix_caching=False, max_num_batched_tokens=48), ps, GREEDY)
    assert chunked == whole


def test_local_prefix_reuse(tiny):
    rng = random.Random(3)
    shared = [rng.randrange(3, 259) for _ in range(100)]
    a, b = shared + [10, 11, 12], shared + [20, 21]
    cold = make_engine(tiny, enable_prefix_caching=False)
    expected = run_all(cold, [a, b], GREEDY)
    engine = make_engine(tiny)
    ra = engine.add_request(a, GREEDY)
    while engine.has_unfinished():
        engine.step()
    rb = engine.add_request(b, GREEDY)
    while engine.has_unfinished():
        engine.step()
    assert rb.num_cached_tokens == 96  # six full 16-token blocks of the shared prefix
    assert [ra.output_token_ids, rb.output_token_ids] == expected


def test_preemption_under_memory_pressure(tiny):
    ps = prompts(8, seed=4, lo=40, hi=80)
    params = SamplingParams(max_tokens=60, ignore_eos=True)
    roomy = run_all(make_engine(tiny, enable_prefix_caching=False), ps, params)
    tight = make_engine(tiny, enable_prefix_caching=False, num_kv_blocks=24)
    assert run_all(tight, ps, params) == roomy
    assert tight.scheduler.num_preemptions > 0
    assert tight.block_manager.num_free_blocks == 24


def test_stop_tokens_and_eos(tiny):
    engine = make_engine(tiny)
    free = run_all(engine, [[5, 6, 7]], SamplingParams(max_tokens=10, ignore_eos=True))[0]
    stop_at = free[3]
    out = run_all(engine, [[5, 6, 7]], SamplingParams(max_tokens=10, stop_token_ids=(stop_at,)))[0]
    assert out == free[: free.index(stop_at) + 1]
    req = engine.add_request([5, 6, 7], SamplingParams(max_tokens=10))
    engine.scheduler._eos = frozenset({stop_at})
    while engine.has_unfinished():
        engine.step()
    assert req.finish_reason == "stop" and req.output_token_ids[-1] == stop_at


def test_sampling_is_seeded_and_top_p_tiny_is_greedy(tiny):
    engine = make_engine(tiny)
    p = prompts(1, seed=5)[0]
    hot = SamplingParams(max_tokens=30, temperature=1.5, seed=7, ignore_eos=True)
    a = run_all(engine, [p], hot)[0]
    b = run_all(engine, [p], hot)[0]
    c = run_all(engine, [p], SamplingParams(max_tokens=30, temperature=1.5, seed=8, ignore_eos=True))[0]
    assert a == b and a != c
    nucleus = run_all(engine, [p], SamplingParams(max_tokens=30, temperature=1.0, top_p=1e-6, ignore_eos=True))[0]
    assert nucleus[:20] == run_all(engine, [p], GREEDY)[0]


def test_abort_frees_blocks(tiny):
    engine = make_engine(tiny)
    req = engine.add_request(prompts(1, seed=6)[0], SamplingParams(max_tokens=50, ignore_eos=True))
    engine.step()
    assert engine.abort_request(req.request_id)
    assert req.finish_reason == "abort" and not engine.has_unfinished()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_bad_requests_get_clear_errors(tiny):
    engine = make_engine(tiny, max_model_len=256)
    with pytest.raises(ModelError, match="context is 256"):
        engine.add_request([5] * 300)
    with pytest.raises(ModelError, match="empty"):
        engine.add_request("")
    with pytest.raises(ModelError, match="token ids must be in"):
        engine.add_request([1, 2, 100000])
    with pytest.raises(ConfigError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(ConfigError, match="dtype"):
        EngineConfig(dtype="int4")
    small = make_engine(tiny, num_kv_blocks=2)
    with pytest.raises(ModelError, match="KV blocks"):
        small.add_request([5] * 40, SamplingParams(max_tokens=10))
    assert not engine.has_unfinished()


def test_generation_stops_at_context_length(tiny):
    engine = make_engine(tiny, max_model_len=64)
    req = engine.add_request([5] * 60, SamplingParams(max_tokens=50, ignore_eos=True))
    while engine.has_unfinished():
        engine.step()
    assert req.finish_reason == "length" and req.num_tokens == 64


def test_llm_entry_point(tiny):
    from shadowserve.llm import LLM

    llm = LLM("tiny-random", progress=False)
    outs = llm.generate(["hello", "world wide"], SamplingParams(max_tokens=5, ignore_eos=True))
    assert [o.prompt for o in outs] == ["hello", "world wide"]
    assert all(len(o.token_ids) == 5 and o.ttft_ms > 0 and o.tpot_ms > 0 for o in outs)
    with pytest.raises(ConfigError, match="unknown LLM option"):
        LLM("tiny-random", bogus=1)


def test_llm_kv_quality_picks_the_codec(tiny):
    """``LLM(..., kv_quality=)``: lossless fetches reproduce recompute; a bad or doubled choice is refused."""
    from shadowserve.config import CodecConfig
    from shadowserve.llm import LLM

    prompt = list(range(3, 3 + 300))
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    with LLM("tiny-random", progress=False) as plain:
        want = plain.generate([prompt], params)[0].token_ids
    url = f"memory://test-llm-quality-{id(prompt)}"
    with LLM("tiny-random", store=url, fetch_mode="sync", kv_quality="lossless", progress=False) as llm:
        assert llm.generate([prompt], params)[0].token_ids == want
        llm.flush()
    with LLM("tiny-random", store=url, fetch_mode="sync", kv_quality="lossless", progress=False) as llm:
        out = llm.generate([prompt], params)[0]
    assert out.num_fetched_tokens == 256 and out.token_ids == want  # fetched, losslessly
    with pytest.raises(ConfigError, match="unknown kv_quality"):
        LLM("tiny-random", kv_quality="best")
    with pytest.raises(ConfigError, match="not both"):
        LLM("tiny-random", kv_quality="high", codec=CodecConfig())


def test_long_context_decode_path_gives_same_tokens(tiny, monkeypatch):
    """Decode over long contexts attends one sequence at a time; tokens equal the padded-batch path."""
    import shadowserve.engine.model_runner as model_runner

    ps = prompts(3, seed=5, lo=40, hi=90) + prompts(2, seed=6, lo=5, hi=20)
    params = SamplingParams(max_tokens=40, ignore_eos=True)  # decodes cross several block boundaries
    monkeypatch.setattr(model_runner, "PER_SEQUENCE_DECODE_MIN_CONTEXT", 10**9)
    batched = run_all(make_engine(tiny, enable_prefix_caching=False), ps, params)
    monkeypatch.setattr(model_runner, "PER_SEQUENCE_DECODE_MIN_CONTEXT", 48)
    engine = make_engine(tiny, enable_prefix_caching=False)
    calls = []
    real = engine.runner.model.forward
    monkeypatch.setattr(engine.runner.model, "forward",
                        lambda ids, pos, kv, meta: calls.append(meta.decode_sequences is not None) or real(ids, pos, kv, meta))
    assert run_all(engine, ps, params) == batched
    assert any(calls) and not all(calls)  # both paths ran (short contexts early, long ones later)
