"""Shared set-up for the fetch benchmarks: a real store server, warmed with real documents' KV,
and engines for each fetch mode built over one loaded model with the same core split."""

from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import dataclass, field
from pydoc_data.topics import topics

from shadowserve.config import BASELINE_PLACEMENTS, CodecConfig, DataPlaneConfig, EngineConfig
from shadowserve.engine.engine import LLMEngine
from shadowserve.engine.request import Request, SamplingParams
from shadowserve.errors import ConfigError
from shadowserve.llm import create_engine
from shadowserve.model.loader import LoadedModel, load_model


@dataclass
class Harness:
    loaded: LoadedModel
    store_url: str
    codec: CodecConfig
    chunk_size: int = 256
    kv_cache_memory: str = "2GiB"
    device: str = "cpu"
    workers: int = 1  # decompress and dequantize threads of the data plane (more on many-core machines)
    dataplane_cores: str = "auto"
    baseline_cores: str = "reserved"  # where sync/thread pipelines run unless a mode label says (split_mode)
    # The cores this process may use before any engine pins it (an engine pins its whole process).
    cores: tuple[int, ...] = field(default_factory=lambda: tuple(sorted(os.sched_getaffinity(0))))

    def unpin(self) -> None:
        """Give this process back every core it started with (before splitting cores again)."""
        os.sched_setaffinity(0, self.cores)

    def engine_config(self, **overrides) -> EngineConfig:
        """The engine settings every run of a benchmark shares (model, dtype, device, memory)."""
        settings = dict(model=self.loaded.name, dtype=dtype_name(self.loaded), device=self.device,
                        kv_cache_memory=self.kv_cache_memory, enable_prefix_caching=False,
                        max_num_batched_tokens=8192)
        return EngineConfig(**{**settings, **overrides})

    def engine(self, mode: str, store_url: str | None = None, save: bool = False, **plane) -> LLMEngine:
        """An engine in ``mode`` with the engine pinned to its cores and the data plane to the rest.

        ``mode`` may name a baseline's placement: ``thread@engine`` runs the thread pipeline on the
        engine's cores whatever ``baseline_cores`` says (see ``split_mode``)."""
        mode, placement = split_mode(mode)
        w = self.workers
        sized = dict(fetch_workers=max(2, w), decompress_workers=w, dequantize_workers=w,
                     receive_slots=max(8, 2 * w), staging_slots=max(4, 2 * w), kv_slots=max(4, 2 * w),
                     save_workers=w, dataplane_cores=self.dataplane_cores,
                     baseline_cores=placement or self.baseline_cores,
                     fetch_policy="always")  # these suites time fetching itself; `bench tiers` times the policy
        dp = DataPlaneConfig(fetch_mode=mode, pin_cores=True, chunk_size=self.chunk_size, save=save,
                             **{**sized, **plane})
        url = None if mode == "recompute" else (store_url or self.store_url)
        return create_engine(self.engine_config(), loaded=self.loaded, progress=False, dataplane=dp, store_url=url,
                             codec=self.codec)

    def local_engine(self, **overrides) -> LLMEngine:
        """An engine with no store (baselines with the KV already local), pinned like the others."""
        dp = DataPlaneConfig(fetch_mode="recompute", pin_cores=True, dataplane_cores=self.dataplane_cores)
        return LLMEngine(self.engine_config(**overrides), loaded=self.loaded, progress=False, dataplane=dp)

    def warm(self, prompts: list[list[int]]) -> None:
        """Compute and save the prompts' full chunks in the store (the cold pass)."""
        eng = self.engine("thread", save=True)
        try:
            run_to_end(eng, [eng.add_request(p, SamplingParams(max_tokens=1)) for p in prompts])
            eng.flush(timeout=600)
        finally:
            eng.close()


def split_mode(label: str) -> tuple[str, str | None]:
    """``"thread@engine"`` -> ("thread", "engine"); ``"offload"`` -> ("offload", None).

    A placement suffix lets one run put the same baseline on both placements side by side."""
    mode, _, placement = label.partition("@")
    if placement and placement not in BASELINE_PLACEMENTS:
        raise ConfigError(f"unknown placement {placement!r} in mode {label!r}: use "
                          f"{' or '.join(BASELINE_PLACEMENTS)}")
    if placement and mode not in ("sync", "thread"):
        raise ConfigError(f"only the sync and thread baselines take a placement, not {label!r}")
    return mode, placement or None


def dtype_name(loaded: LoadedModel) -> str:
    return str(loaded.model.dtype).removeprefix("torch.")


def add_model_arguments(p, kv_cache_memory: str = "2GiB") -> None:
    """--model/--dtype/--device/--kv-cache-memory, shared by the fetch benchmarks (GPU runs set all four)."""
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16 (bfloat16 on a GPU)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--kv-cache-memory", default=kv_cache_memory)
    p.add_argument("--dataplane-workers", type=int, default=1,
                   help="decompress and dequantize threads in every mode (up to the data-plane cores)")
    p.add_argument("--dataplane-cores", default="auto", help="cores reserved for the data plane, e.g. 12-15")
    p.add_argument("--baseline-cores", default="reserved", choices=BASELINE_PLACEMENTS,
                   help="where sync and thread run their pipelines: reserved (the data-plane cores, as offload: "
                        "what the process boundary buys) or engine (the engine's own cores, the reserved ones "
                        "idle: the paper's CacheGen-Async placement); a mode label like thread@engine overrides it")


def load_for(args):
    """The benchmark's model, loaded once for every engine it builds."""
    return load_model(args.model, args.dtype, device=args.device, progress=False)


def itl_median_ms(reqs: list[Request]) -> float:
    """Median inter-token latency: the typical decode step, robust to the odd prefill-heavy step."""
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


def store_url(base: str, bandwidth_gbps: float | None) -> str:
    """The store URL with an emulated link of ``bandwidth_gbps`` (None: unshaped)."""
    if bandwidth_gbps is None:
        return base
    return f"{base}{'&' if '?' in base else '?'}bandwidth={bandwidth_gbps:g}gbit"
