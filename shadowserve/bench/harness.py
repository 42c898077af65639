"""Shared set-up for the fetch benchmarks: a real store server, warmed with real documents' KV,
and engines for each fetch mode built over one loaded model with the same core split."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field

from shadowserve.config import CodecConfig, DataPlaneConfig, EngineConfig
from shadowserve.engine.engine import LLMEngine
from shadowserve.engine.sequence import Request, SamplingParams
from shadowserve.model.loader import LoadedModel


@dataclass
class Harness:
    loaded: LoadedModel
    store_url: str
    codec: CodecConfig
    chunk_size: int = 256
    kv_cache_memory: str = "2GiB"
    # The cores this process may use before any engine pins it (an engine pins its whole process).
    cores: tuple[int, ...] = field(default_factory=lambda: tuple(sorted(os.sched_getaffinity(0))))

    def unpin(self) -> None:
        """Give this process back every core it started with (before splitting cores again)."""
        os.sched_setaffinity(0, self.cores)

    def engine(self, mode: str, store_url: str | None = None, save: bool = False, **plane) -> LLMEngine:
        """An engine in ``mode`` with the engine pinned to its cores and the data plane to the rest."""
        dp = DataPlaneConfig(fetch_mode=mode, pin_cores=True, chunk_size=self.chunk_size, save=save, **plane)
        cfg = EngineConfig(model=self.loaded.name, kv_cache_memory=self.kv_cache_memory,
                           enable_prefix_caching=False, max_num_batched_tokens=8192)
        url = None if mode == "recompute" else (store_url or self.store_url)
        return LLMEngine(cfg, loaded=self.loaded, progress=False, dataplane=dp, store_url=url, codec=self.codec)

    def warm(self, prompts: list[list[int]]) -> None:
        """Compute and save the prompts' full chunks in the store (the cold pass)."""
        eng = self.engine("thread", save=True)
        try:
            run_to_end(eng, [eng.add_request(p, SamplingParams(max_tokens=1)) for p in prompts])
            eng.flush(timeout=600)
        finally:
            eng.close()


def pin_to_dataplane_cores(pid: int) -> None:
    """Keep a helper process (the store server: the "remote" machine) off the engine's cores."""
    _, plane = DataPlaneConfig().split_cores()
    try:
        os.sched_setaffinity(pid, plane)
    except OSError:
        pass


def itl_median_ms(reqs: list[Request]) -> float:
    """Median inter-token latency: the typical decode step, robust to the odd prefill-heavy step."""
    import statistics

    gaps = [b - a for r in reqs for a, b in zip(r.token_times, r.token_times[1:])]
    return statistics.median(gaps) * 1e3


def run_to_end(eng: LLMEngine, reqs: list[Request], timeout: float = 600.0) -> list[Request]:
    deadline = time.monotonic() + timeout
    while any(not r.is_finished for r in reqs):
        if time.monotonic() > deadline:
            raise TimeoutError("benchmark requests did not finish")
        eng.step()
    return reqs


def doc_prompt(tokenizer, tokens: int, offset: int, suffix: str = "\n\nQuestion: what is this about?") -> list[int]:
    """A real-text document of exactly ``tokens`` tokens (a chunk multiple) plus a short question."""
    from pydoc_data.topics import topics

    ids: list[int] = []
    keys = sorted(topics)
    i = offset
    while len(ids) < tokens:
        ids.extend(tokenizer.encode(topics[keys[i % len(keys)]]))
        i += 1
    return ids[:tokens] + tokenizer.encode(suffix)


def write_json(path: str | None, payload: dict) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(payload, f, indent=2)
