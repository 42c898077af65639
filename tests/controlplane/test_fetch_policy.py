"""Fetch or recompute: the estimates form from measurements and the decision follows them."""

from __future__ import annotations

import pytest

from shadowserve.config import DataPlaneConfig, EngineConfig
from shadowserve.controlplane.fetch_policy import FetchPolicy, choose
from shadowserve.controlplane.prefill_fit import PrefillFit
from shadowserve.dataplane.messages import Completion
from shadowserve.engine.remote_kv import pairs_of, step_work
from shadowserve.llm import create_engine
from shadowserve.server.metrics import ServerMetrics
from tests.dataplane import test_end_to_end as e2e
from tests.dataplane.test_end_to_end import CHUNK, LOSSLESS, prompts, run, warm_store

reference = e2e.reference  # the recompute outputs fixture, shared
MB = 1_000_000


# A step's true cost in the attention tests: per step, per token, per query-key pair, per KV token read
# (about smollm2-135m's on one core: a 12-token step after 1024 cached tokens ~60 ms, a 1-token one ~26 ms).
STEP, TOKEN, PAIR, KV = 0.02, 0.003, 1.3e-6, 6.5e-6
# Full prefills of several lengths, and suffixes after fetched prefixes (what a serving engine sees).
STEPS = [(256, 0), (512, 0), (1036, 0), (2060, 0), (12, 1024), (12, 2048), (524, 512)]


def true_step(tokens: int, context: int) -> float:
    return STEP + TOKEN * tokens + PAIR * pairs_of(tokens, context) + KV * (context + tokens)


def fetched_once(p: FetchPolicy, link_bytes_per_s: float, store: bool = True) -> None:
    """One fetch of 4 chunks of 1 MB over the given link (``store``: from the store, else from the tier)."""
    wire = 4 * MB / link_bytes_per_s
    p.observe(Completion(job_id=1, request_id="r", kind="fetch", num_chunks=4, ok_chunks=4, nbytes=4 * MB,
                         seconds=wire + 0.01, stage_seconds={"decompress": 0.02, "dequantize": 0.02},
                         store_bytes=4 * MB if store else 0, store_seconds=wire if store else 0.0,
                         tier_chunks=0 if store else 4, tier_bytes=0 if store else 4 * MB))


def measured(link_bytes_per_s: float, policy: str = "auto", **plane) -> FetchPolicy:
    """A policy that saw one fetch of 4 chunks of 1 MB over the given link, and prefill steps at 1000 tok/s."""
    p = FetchPolicy(DataPlaneConfig(chunk_size=256, fetch_policy=policy, **plane))
    fetched_once(p, link_bytes_per_s)
    for tokens in (256, 512, 1024):
        p.observe_step(tokens, 0, tokens / 1000)
    return p


def test_prefill_fit_recovers_step_and_token_costs():
    fit = PrefillFit()
    for x in (100, 200, 400, 800):
        fit.add(x, 0.01 + x * 0.002)
    a, b, c, d = fit.coefficients()
    assert a == pytest.approx(0.01) and b == pytest.approx(0.002) and c == d == 0.0


def test_prefill_fit_prices_the_rest_after_a_partial_fetch_at_its_context():
    """524 tokens after 512 fetched cost more per token than a prefill from the start: a per-token fit,
    fed the same step times, is off by over 5% there; the fit with attention terms is exact."""
    fit, per_token = PrefillFit(), PrefillFit()
    for n, s in STEPS:
        fit.add(n, true_step(n, s), pairs_of(n, s), s + n)
        per_token.add(n, true_step(n, s))  # what the engine reported before: tokens and seconds only
    assert fit.coefficients() == pytest.approx((STEP, TOKEN, PAIR, KV), rel=1e-3)
    for n, s in ((524, 512), (268, 768), (12, 4096), (3000, 0)):
        assert fit.predict(n, s) == pytest.approx(true_step(n, s), rel=1e-3)
    assert abs(per_token.predict(1036, 0) / true_step(1036, 0) - 1) > 0.05


def test_prefill_fit_uses_a_term_only_with_a_step_shape_to_spare():
    """Three step shapes fit three terms exactly, noise and all: the pair term waits for a fourth shape."""
    fit = PrefillFit()
    shapes = [(518, 0), (1036, 0), (12, 1024)]  # bench tiers' warm-up: two miss lengths and a suffix
    for _ in range(5):
        for n, s in shapes:
            fit.add(n, true_step(n, s) * 1.1 if n == 1036 else true_step(n, s), pairs_of(n, s), s + n)  # one slow
    a, b, c, d = fit.coefficients()
    assert b > 0 and c == d == 0.0
    fit.add(256, true_step(256, 0), pairs_of(256, 0), 256)
    assert fit.coefficients()[2] > 0  # four shapes: step, token and pair terms, one residual


def test_decision_weighs_the_context_of_what_is_left_to_compute():
    """8 Mbit/s, a 1036-token prompt with 4 stored chunks: recomputing is truly 6% faster than fetching.
    With step times alone the policy fetched; with the attention terms it recomputes, and every predicted
    TTFT matches the fetch model plus the true compute cost."""
    def policy(attention: bool) -> FetchPolicy:
        p = FetchPolicy(DataPlaneConfig(chunk_size=256))
        fetched_once(p, 8e6 / 8)
        for n, s in STEPS:
            p.observe_step(n, 0, true_step(n, s), *((pairs_of(n, s), s + n) if attention else ()))
        return p

    p = policy(attention=True)
    truth = [p._fetch_seconds(k, 0) + true_step(1036 - 256 * k, 256 * k) for k in range(5)]
    assert min(range(5), key=truth.__getitem__) == 0 and truth[4] > 1.05 * truth[0]
    d = p.decide("r", 1036, [False] * 4)
    assert (d.decision, d.fetch_chunks) == ("recompute", 0)
    assert d.attention_ns_per_pair == pytest.approx(PAIR * 1e9, rel=1e-3)
    assert d.predicted_ttft_fetch_ms == pytest.approx(truth[4] * 1e3, rel=1e-3)
    assert d.predicted_ttft_recompute_ms == pytest.approx(truth[0] * 1e3, rel=1e-3)
    assert policy(attention=False).decide("r", 1036, [False] * 4).decision == "fetch"  # the old misjudgement


def test_fetches_everything_before_any_measurement():
    p = FetchPolicy(DataPlaneConfig(chunk_size=256))
    d = p.decide("r", 2000, [False] * 7)
    assert (d.decision, d.reason, d.fetch_chunks) == ("fetch", "optimistic", 7)


def test_slow_link_recomputes_and_fast_link_fetches():
    slow = measured(1e6 / 8).decide("r", 2000, [False] * 7)  # 1 Mbit/s: 8 s per chunk
    assert (slow.decision, slow.reason, slow.fetch_chunks) == ("recompute", "measured", 0)
    assert slow.predicted_ttft_recompute_ms < slow.predicted_ttft_fetch_ms
    fast = measured(10e9 / 8).decide("r", 2000, [False] * 7)  # 10 Gbit/s: under a millisecond per chunk
    assert (fast.decision, fast.fetch_chunks) == ("fetch", 7)
    assert fast.predicted_ttft_ms == fast.predicted_ttft_fetch_ms < fast.predicted_ttft_recompute_ms


def test_tier_chunks_cost_no_link_time():
    p = measured(1e6 / 8)
    d = p.decide("r", 2000, [True, True, True, False, False, False, False])
    assert (d.decision, d.fetch_chunks, d.tier_chunks) == ("partial", 3, 3)
    assert p.counts == {("partial", "measured"): 1}
    assert p.decision("r") is d
    p.forget("r")
    assert p.decision("r") is None


@pytest.mark.parametrize("policy,chunks", [("always", 7), ("never", 0)])
def test_fixed_policies_ignore_estimates(policy, chunks):
    d = measured(1e6 / 8, policy).decide("r", 2000, [False] * 7)
    assert (d.fetch_chunks, d.reason) == (chunks, "policy")


@pytest.mark.parametrize("bandwidth,decision", [("?bandwidth=1mbit", "recompute"), ("", "fetch")])
def test_decision_flips_with_the_link(tiny, reference, tmp_path, bandwidth, decision):
    """Warm-up: one miss (prefill timing) and one optimistic fetch (link timing); then the link decides.

    A 900-token prefix (28 chunks): on tiny-random a 200-token one is a near tie on an unshaped link
    (fetch ~4 ms against compute ~6 ms, a fetch's fixed cost dominating), which timing noise flipped."""
    url = f"file://{tmp_path}/store"
    ps = prompts(3, seed=31, shared_prefix=900)
    warm_store(tiny, url, ps[:1])
    cfg = DataPlaneConfig(fetch_mode="thread", chunk_size=CHUNK, save=False)
    eng = create_engine(EngineConfig(model="tiny-random", kv_cache_memory="16MiB", enable_prefix_caching=False),
                        loaded=tiny, dataplane=cfg, store_url=url + bandwidth, codec=LOSSLESS)
    warm = run(eng, prompts(1, seed=32, shared_prefix=900) + ps[1:2])
    assert warm[1].kv_decision["reason"] == "optimistic" and warm[1].num_fetched_tokens == 900 // CHUNK * CHUNK
    req = run(eng, ps[2:])[0]
    assert req.kv_decision["decision"] == decision and req.kv_decision["reason"] == "measured"
    assert req.num_fetched_tokens == (0 if decision == "recompute" else 900 // CHUNK * CHUNK)
    assert [r.output_token_ids for r in warm[1:] + [req]] == reference(ps[1:])
    counts = eng.kv_manager.policy.counts
    assert counts[(decision, "measured")] == 1 and counts[("fetch", "optimistic")] == 1
    eng.close()


def test_a_partial_fetch_must_win_clearly():
    """At a near tie (bench tiers at 10 Mbit/s: partial predicted 2% ahead, 13% behind in fact) the
    better of all-or-nothing is taken; a clear win (tier chunks first) still fetches part."""
    assert choose([3.215, 3.140, 3.30, 3.35, 3.424]) == 0  # partial only 2% ahead of recompute
    assert choose([3.50, 3.40, 3.30, 3.25, 3.20]) == 4  # fetching everything is best outright
    assert choose([5.0, 3.0, 1.0, 4.0]) == 2  # tier chunks make a partial fetch far cheaper
    assert choose([2.0, 2.0]) == 1  # a tie fetches (it keeps the link estimate fresh)


def test_a_slow_link_is_explored_every_nth_decision_and_a_faster_one_flips_it():
    p = measured(1e6 / 8, fetch_explore_every=4, fetch_explore_seconds=0)  # 1 Mbit/s: recompute
    decisions = [p.decide(f"r{i}", 2000, [False] * 7) for i in range(4)]
    assert [d.decision for d in decisions[:3]] == ["recompute"] * 3
    assert (decisions[3].decision, decisions[3].reason, decisions[3].fetch_chunks) == ("partial", "explore", 1)
    assert p.counts == {("recompute", "measured"): 3, ("partial", "explore"): 1}
    assert p.decide("r4", 2000, [False] * 7).decision == "recompute"  # the count starts again
    for _ in range(3):
        fetched_once(p, 10e9 / 8)  # the explored fetches came back fast: the link got faster
    d = p.decide("r5", 2000, [False] * 7)
    assert (d.decision, d.reason, d.fetch_chunks) == ("fetch", "measured", 7)


def test_exploration_after_a_quiet_spell_fetches_the_tier_run_and_one_store_chunk():
    now = [0.0]
    p = FetchPolicy(DataPlaneConfig(chunk_size=256, fetch_explore_every=0, fetch_explore_seconds=30),
                    clock=lambda: now[0])
    fetched_once(p, 1e6 / 8)
    for tokens in (256, 512, 1024):
        p.observe_step(tokens, 0, tokens / 1000)
    in_tier = [True, True, False, False, False, False, False]
    assert p.decide("a", 2000, in_tier).reason == "measured"  # tier chunks only: the store is left out
    now[0] = 29.0
    assert p.decide("b", 2000, in_tier).reason == "measured"
    now[0] = 31.0  # 30 s since the store last served
    d = p.decide("c", 2000, in_tier)
    assert (d.decision, d.reason, d.fetch_chunks, d.tier_chunks) == ("partial", "explore", 3, 2)
    now[0] = 40.0
    assert p.decide("d", 2000, in_tier).reason == "measured"  # the clock restarted with the exploration
    fetched_once(p, 1e6 / 8, store=False)  # a tier-only fetch says nothing of the link: no reset
    now[0] = 62.0
    assert p.decide("e", 2000, in_tier).reason == "explore"


def test_exploration_can_be_turned_off_and_never_happens_for_the_tier_alone():
    off = measured(1e6 / 8, fetch_explore_every=0, fetch_explore_seconds=0)
    assert {off.decide(f"r{i}", 2000, [False] * 7).reason for i in range(50)} == {"measured"}
    tier_only = measured(1e6 / 8, fetch_explore_every=1)
    assert tier_only.decide("t", 2000, [True] * 7).decision == "fetch"  # everything from the tier
    fixed = measured(1e6 / 8, "never", fetch_explore_every=1)
    assert {fixed.decide(f"r{i}", 2000, [False] * 7).reason for i in range(3)} == {"policy"}


def test_an_exploration_end_to_end_fetches_one_chunk_and_shows_in_metrics(tiny, reference, tmp_path):
    """On a 1 Mbit/s link the policy recomputes; with exploration every 2nd such decision, the next request
    fetches its first chunk over the link (and computes the rest), with recompute's tokens."""
    url = f"file://{tmp_path}/store"
    ps = prompts(4, seed=33, shared_prefix=900)
    warm_store(tiny, url, ps[:1])
    cfg = DataPlaneConfig(fetch_mode="thread", chunk_size=CHUNK, save=False, fetch_explore_every=2,
                          fetch_explore_seconds=0)
    eng = create_engine(EngineConfig(model="tiny-random", kv_cache_memory="16MiB", enable_prefix_caching=False),
                        loaded=tiny, dataplane=cfg, store_url=url + "?bandwidth=1mbit", codec=LOSSLESS)
    run(eng, prompts(1, seed=34, shared_prefix=900) + ps[1:2])  # warm-up: a miss, an optimistic fetch
    skipped, explored = (run(eng, [p])[0] for p in ps[2:])
    assert skipped.kv_decision["decision"] == "recompute" and skipped.num_fetched_tokens == 0
    assert explored.kv_decision["reason"] == "explore" and explored.kv_decision["fetch_chunks"] == 1
    assert explored.num_fetched_tokens == CHUNK
    assert [r.output_token_ids for r in (skipped, explored)] == reference(ps[2:])
    text = ServerMetrics(eng).render().decode()
    assert 'shadowserve_kv_decisions_total{decision="partial",reason="explore"} 1.0' in text
    eng.close()


def test_step_work_counts_prefill_apart_from_decode():
    # A 300-token prompt's second chunk of 100 (200 computed) beside a decoding request (1 token after 50).
    work = step_work([(100, 200, 300), (1, 50, 40)])
    assert work == (100, 1, pairs_of(100, 200) + pairs_of(1, 50), 300 + 51)
    assert step_work([(8, 300, 300)]).prefill_tokens == 0  # past its prompt: decode, not prefill
