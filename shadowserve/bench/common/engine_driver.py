"""The in-process driver: runs the engine's step loop in the calling thread and admits each
request when its arrival time has passed, so no HTTP or tokenization cost is in the numbers."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

from shadowserve.bench.common.drivers import Driver, RequestRecord, RequestSpec
from shadowserve.engine.engine import LLMEngine
from shadowserve.engine.request import Request, SamplingParams
from shadowserve.errors import ShadowServeError


class EngineDriver(Driver):
    """Drives one :class:`LLMEngine`; output lengths are exact (``ignore_eos``), as in vLLM's bench."""

    def __init__(self, engine: LLMEngine, timeout: float = 3600.0) -> None:
        self.engine = engine
        self.timeout = timeout

    def run(self, specs: list[RequestSpec], max_concurrency: int | None = None,
            progress: Callable[[], None] | None = None) -> list[RequestRecord]:
        """A request's start is its scheduled arrival (it waits like a queued HTTP request while a
        step runs), or the moment a slot freed up when ``max_concurrency`` held it back."""
        eng = self.engine
        order = deque(sorted(range(len(specs)), key=lambda i: specs[i].arrival_s))
        records: list[RequestRecord | None] = [None] * len(specs)
        live: dict[int, tuple[Request, RequestRecord]] = {}
        t0 = time.perf_counter()
        deadline = t0 + self.timeout
        blocked_at = -1.0  # last time the concurrency limit held back a request that was due
        while order or live:
            now = time.perf_counter()
            while order and t0 + specs[order[0]].arrival_s <= now:
                if max_concurrency is not None and len(live) >= max_concurrency:
                    blocked_at = now
                    break
                i = order.popleft()
                spec = specs[i]
                # A request that only waited for the running step starts at its arrival (a queued
                # HTTP request would); one the limit held back is sent now, as a client would.
                due = t0 + spec.arrival_s
                rec = RequestRecord(start=now if due <= blocked_at else due, prompt_tokens=len(spec.prompt_ids))
                try:
                    req = eng.add_request(list(spec.prompt_ids),
                                          SamplingParams(max_tokens=spec.max_tokens, ignore_eos=True))
                except ShadowServeError as exc:
                    rec.ok, rec.error, rec.end = False, str(exc), time.perf_counter()
                    records[i] = rec
                    if progress:
                        progress()
                    continue
                live[i] = (req, rec)
            if live:
                eng.step()
            elif order:
                time.sleep(max(0.0, min(0.01, t0 + specs[order[0]].arrival_s - time.perf_counter())))
            for i in [i for i, (req, _) in live.items() if req.is_finished]:
                req, rec = live.pop(i)
                records[i] = _settle(req, rec)
                if progress:
                    progress()
            if time.perf_counter() > deadline:
                for i, (req, rec) in live.items():
                    eng.abort_request(req.request_id)
                    rec.ok, rec.error, rec.end = False, "timed out", time.perf_counter()
                    records[i] = rec
                for i in order:
                    records[i] = RequestRecord(start=t0 + specs[i].arrival_s, prompt_tokens=len(specs[i].prompt_ids),
                                               ok=False, error="not sent: run timed out")
                break
        return [r for r in records if r is not None]


def _settle(req: Request, rec: RequestRecord) -> RequestRecord:
    rec.token_times = list(req.token_times)
    rec.first_token = req.first_token_time
    rec.end = req.token_times[-1] if req.token_times else req.finish_time  # the last token is the end of output
    rec.output_tokens = len(req.output_token_ids)
    rec.fetched_tokens = req.num_fetched_tokens
    if req.finish_reason == "abort":
        rec.ok, rec.error = False, "aborted"
    return rec
