"""Fetch or recompute, per request: running estimates from measurements, and the choice they imply.

Below some link rate fetching a chunk is slower than computing it. The control plane measures, never
assumes: the link's rate (store bytes over the wall span of a job's store reads), the data plane's
decode cost per chunk (its decompress and dequantize busy time, stages overlapping), a fixed per-fetch
overhead (what a job took beyond that model), the mean compressed chunk size, and the engine's prefill
cost (``prefill_fit.py``: per step, per token, per attended query-key pair and per KV token read, fitted
to the step times the engine reports, so computing the rest after ``k`` fetched chunks is priced at its
real context). For each lookup it predicts the time to first token for every ``k`` leading chunks fetched
(the rest computed) and takes the fastest ``k``: all (``fetch``), some (``partial``) or none
(``recompute``). Tier chunks cost no link time. Until the estimates exist it fetches everything
(``optimistic``), so they can form.

A link judged too slow is never measured again by decisions that stop using it, so once the store has
been left out for ``fetch_explore_every`` such decisions or ``fetch_explore_seconds`` (whichever first),
the next one fetches the leading chunks up to one store chunk anyway (``explore``): one chunk's cost
when the link is still slow, and a fresh link estimate that flips the decision when it got fast.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from shadowserve.config import DataPlaneConfig
from shadowserve.controlplane.prefill_fit import PrefillFit
from shadowserve.dataplane.messages import Completion

DECISIONS = ("fetch", "partial", "recompute")
# A partial fetch must be predicted this much faster than the better of fetching every hit chunk and
# computing them all. At a near tie the estimates' own error (~10% measured by bench tiers) decides
# more than the model does, and a partial fetch pays for both paths' misjudgements.
PARTIAL_MARGIN = 0.05


def choose(times: list[float], margin: float = PARTIAL_MARGIN) -> int:
    """How many leading chunks to fetch, given the predicted TTFT of fetching ``k`` of them (``times[k]``)."""
    best = min(range(len(times)), key=lambda k: (times[k], -k))
    extreme = min((0, len(times) - 1), key=lambda k: (times[k], -k))
    return extreme if times[best] > times[extreme] * (1 - margin) else best


REASONS = ("measured", "optimistic", "policy", "explore")


class Ewma:
    """An exponentially weighted mean (None until the first sample)."""

    def __init__(self, alpha: float = 0.3) -> None:
        self.alpha, self.value = alpha, None

    def add(self, x: float) -> None:
        self.value = x if self.value is None else self.value + self.alpha * (x - self.value)


@dataclass(frozen=True)
class Decision:
    """What was decided for one request, and on which estimates (shown per request and in logs)."""

    decision: str  # fetch | partial | recompute (miss: nothing held)
    reason: str  # measured | optimistic | policy | explore (the store fetched to re-measure a slow link)
    hit_chunks: int  # leading chunks the tier or the store holds
    tier_chunks: int  # of the fetched ones, how many the local tier holds
    fetch_chunks: int
    predicted_ttft_fetch_ms: float | None
    predicted_ttft_recompute_ms: float | None
    predicted_ttft_ms: float | None
    link_gbps: float | None
    decode_ms_per_chunk: float | None
    prefill_tokens_per_s: float | None
    attention_ns_per_pair: float | None = None  # the prefill's per query-key pair term (0: not separable yet)

    def as_dict(self) -> dict:
        return asdict(self)


class FetchPolicy:
    """The estimates and the per-request decisions of one control plane (one store, one engine)."""

    def __init__(self, config: DataPlaneConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.mode, self.chunk_size = config.fetch_policy, config.chunk_size
        self._workers = (config.decompress_workers, config.dequantize_workers)
        self.link_bps, self.decode_s, self.overhead_s, self.chunk_bytes = Ewma(), Ewma(), Ewma(), Ewma()
        self.prefill = PrefillFit()
        self._explore = (config.fetch_explore_every, config.fetch_explore_seconds)
        self._clock = clock
        self._store_skipped = 0  # measured decisions that left every store chunk out, since the store last served
        self._store_used = clock()  # when the store last served a fetch (or an exploration was sent)
        self.step_tokens = 0  # the largest step seen: a long prefill runs in steps of about this many tokens
        self.counts: dict[tuple[str, str], int] = {}
        self._decisions: dict[str, Decision] = {}
        self._lock = threading.Lock()  # decisions are read by the scheduler and by metrics scrapes

    # ---- measurements -----------------------------------------------------------------------

    def observe(self, c: Completion) -> None:
        """A fetch or save completed: update the chunk size, link, decode and overhead estimates."""
        if c.ok_chunks == 0:
            return
        self.chunk_bytes.add(c.nbytes / c.ok_chunks)
        if c.kind != "fetch":
            return
        if c.store_bytes and c.store_seconds > 0:
            self.link_bps.add(c.store_bytes / c.store_seconds)
            self._store_skipped, self._store_used = 0, self._clock()
        st = c.stage_seconds
        dec = st.get("decompress", 0.0) / self._workers[0]
        deq = (st.get("dequantize", 0.0) + st.get("scatter", 0.0)) / self._workers[1]
        if dec + deq > 0:
            self.decode_s.add(max(dec, deq) / c.ok_chunks)
        model = self._fetch_seconds(c.ok_chunks - c.tier_chunks, c.tier_chunks, overhead=False)
        if model is not None:
            self.overhead_s.add(max(0.0, c.seconds - model))

    def observe_step(self, prefill_tokens: int, other_tokens: int, seconds: float, pairs: int = 0,
                     kv_tokens: int = 0) -> None:
        """An engine step that prefilled ``prefill_tokens`` (beside ``other_tokens``) took ``seconds``;
        its tokens attended over ``pairs`` query-key pairs and it read ``kv_tokens`` of KV (0: unknown)."""
        tokens = prefill_tokens + other_tokens
        if prefill_tokens <= 0 or seconds <= 0:
            return
        self.step_tokens = max(self.step_tokens, tokens)
        self.prefill.add(tokens, seconds, pairs, kv_tokens)

    # ---- predictions --------------------------------------------------------------------------

    def _fetch_seconds(self, store_chunks: int, tier_chunks: int, overhead: bool = True) -> float | None:
        if store_chunks + tier_chunks == 0:
            return 0.0
        decode = self.decode_s.value
        link, size = self.link_bps.value, self.chunk_bytes.value
        if decode is None or (store_chunks and (link is None or size is None)):
            return None
        wire = store_chunks * size / link if store_chunks else 0.0
        extra = (self.overhead_s.value or 0.0) if overhead else 0.0
        return max(wire, (store_chunks + tier_chunks) * decode) + extra

    def _prefill_seconds(self, tokens: int, context: int) -> float | None:
        return self.prefill.predict(tokens, context, self.step_tokens)

    def _explore_due(self) -> bool:
        every, seconds = self._explore
        return bool((every and self._store_skipped >= every)
                    or (seconds and self._clock() - self._store_used >= seconds))

    def decide(self, request_id: str, prompt_tokens: int, in_tier: list[bool]) -> Decision:
        """How many of the ``len(in_tier)`` hit chunks to fetch (``in_tier[i]``: chunk i is in the tier)."""
        hit = len(in_tier)
        cs = self.chunk_size
        best, reason = hit, "optimistic"
        times: list[float | None] = []
        if self.mode != "auto":
            best, reason = (hit if self.mode == "always" else 0), "policy"
        elif hit:
            tier = 0
            for k in range(hit + 1):
                fetch = self._fetch_seconds(k - tier, tier)
                compute = self._prefill_seconds(prompt_tokens - k * cs, k * cs)
                times.append(None if fetch is None or compute is None else fetch + compute)
                if k < hit and in_tier[k]:
                    tier += 1
            if all(t is not None for t in times):
                reason = "measured"
                best = choose(times)  # type: ignore[arg-type]
                best, reason = self._maybe_explore(best, in_tier)
        label = "miss" if hit == 0 else "fetch" if best == hit else "recompute" if best == 0 else "partial"
        link, dec, fit = self.link_bps.value, self.decode_s.value, self.prefill.coefficients()
        ms = [None if t is None else round(t * 1e3, 3) for t in times] or [None]
        d = Decision(label, reason, hit, sum(in_tier[:best]), best, ms[-1], ms[0], ms[best] if times else None,
                     None if link is None else round(link * 8 / 1e9, 4),
                     None if dec is None else round(dec * 1e3, 3),
                     None if fit is None else round(1 / fit[1], 1) if fit[1] > 0 else None,
                     None if fit is None else round(fit[2] * 1e9, 3))
        with self._lock:
            self._decisions[request_id] = d
            if hit:
                self.counts[(label, reason)] = self.counts.get((label, reason), 0) + 1
        return d

    def _maybe_explore(self, best: int, in_tier: list[bool]) -> tuple[int, str]:
        """``best`` unless it leaves the store out and an exploration is due: then up to one store chunk."""
        if not all(in_tier[:best]):
            return best, "measured"  # the store serves part of this fetch: the link gets measured anyway
        first_store = next((i for i in range(best, len(in_tier)) if not in_tier[i]), None)
        if first_store is None:
            return best, "measured"  # every chunk left out is in the tier: the link plays no part
        self._store_skipped += 1
        if not self._explore_due():
            return best, "measured"
        self._store_skipped, self._store_used = 0, self._clock()  # one exploration in flight at a time
        return first_store + 1, "explore"

    def decision(self, request_id: str) -> Decision | None:
        with self._lock:
            return self._decisions.get(request_id)

    def forget(self, request_id: str) -> None:
        with self._lock:
            self._decisions.pop(request_id, None)

    def estimates(self) -> dict[str, float | None]:
        """The current estimates, for /metrics."""
        fit = self.prefill.coefficients()
        return {"link_bytes_per_second": self.link_bps.value, "decode_seconds_per_chunk": self.decode_s.value,
                "fetch_overhead_seconds": self.overhead_s.value, "chunk_bytes": self.chunk_bytes.value,
                "prefill_seconds_per_token": None if fit is None else fit[1],
                "prefill_seconds_per_step": None if fit is None else fit[0],
                "prefill_seconds_per_pair": None if fit is None else fit[2],
                "prefill_seconds_per_kv_token": None if fit is None else fit[3]}
