"""Workloads: deterministic for a seed, different across seeds, and the shapes they promise."""

from __future__ import annotations

import statistics

import pytest

from shadowserve.bench.common import workloads as w


@pytest.fixture(scope="module")
def tok():
    from shadowserve.model.tokenizer import byte_tokenizer

    return byte_tokenizer()


@pytest.fixture(scope="module")
def stream(tok):
    return w.topic_tokens(tok)


def test_long_doc_qa_is_deterministic_and_shaped(tok, stream):
    a = w.long_doc_qa(tok, 3, 2, (500, 900), (16, 32), seed=7, stream=stream)
    b = w.long_doc_qa(tok, 3, 2, (500, 900), (16, 32), seed=7, stream=stream)
    c = w.long_doc_qa(tok, 3, 2, (500, 900), (16, 32), seed=8, stream=stream)
    assert a.specs == b.specs and a.warm_prompts == b.warm_prompts
    assert a.specs != c.specs
    assert len(a.specs) == 6 and len(a.warm_prompts) == 3
    assert all(500 <= len(d) <= 900 for d in a.warm_prompts)
    assert all(16 <= s.max_tokens <= 32 for s in a.specs)
    # question-major: request i and i+3 ask about the same document, which is their prefix
    for i, spec in enumerate(a.specs):
        doc = a.warm_prompts[i % 3]
        assert spec.prompt_ids[: len(doc)] == tuple(doc) and len(spec.prompt_ids) > len(doc)


def test_chat_shares_the_system_prompt_and_grows_its_history(tok, stream):
    wl = w.multi_round_chat(tok, 2, 3, system_tokens=200, user_tokens=20, answer_tokens=30, output_len=(8, 8),
                            seed=1, stream=stream)
    assert wl.specs == w.multi_round_chat(tok, 2, 3, 200, 20, 30, (8, 8), seed=1, stream=stream).specs
    system = wl.warm_prompts[0]
    assert len(system) == 200 and all(s.prompt_ids[:200] == tuple(system) for s in wl.specs)
    lengths = [len(s.prompt_ids) for s in wl.specs]
    assert lengths == [220, 220, 270, 270, 320, 320]  # round-major; each round adds user + answer
    # round 2 of conversation 0 extends round 1 of conversation 0, whose context was warmed
    assert wl.specs[2].prompt_ids[:220] == wl.specs[0].prompt_ids
    assert list(wl.specs[2].prompt_ids[:250]) in wl.warm_prompts


def test_prefix_repetition_balances_prefixes(tok, stream):
    wl = w.prefix_repetition(tok, 12, prefix_len=100, suffix_len=10, num_prefixes=3, output_len=5, seed=3,
                             stream=stream)
    assert wl.specs == w.prefix_repetition(tok, 12, 100, 10, 3, 5, seed=3, stream=stream).specs
    counts = [sum(1 for s in wl.specs if s.prompt_ids[:100] == tuple(p)) for p in wl.warm_prompts]
    assert counts == [4, 4, 4]
    assert all(len(s.prompt_ids) == 110 and s.max_tokens == 5 for s in wl.specs)


def test_poisson_arrivals_are_seeded_and_at_the_rate():
    a = w.arrival_offsets(2000, 4.0, seed=5)
    assert a == w.arrival_offsets(2000, 4.0, seed=5) and a != w.arrival_offsets(2000, 4.0, seed=6)
    assert a[0] == 0.0 and all(x <= y for x, y in zip(a, a[1:]))
    gaps = [y - x for x, y in zip(a, a[1:])]
    assert statistics.mean(gaps) == pytest.approx(0.25, rel=0.1)
    assert statistics.stdev(gaps) == pytest.approx(0.25, rel=0.15)  # exponential: stdev == mean
    assert w.arrival_offsets(3, float("inf"), 0) == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError):
        w.arrival_offsets(3, 0, 0)


def test_with_arrivals_keeps_requests_and_order(tok, stream):
    wl = w.prefix_repetition(tok, 5, 50, 5, 2, 4, seed=0, stream=stream)
    timed = w.with_arrivals(wl.specs, 2.0, seed=0)
    assert [s.prompt_ids for s in timed] == [s.prompt_ids for s in wl.specs]
    assert [s.arrival_s for s in timed] == w.arrival_offsets(5, 2.0, 0)
