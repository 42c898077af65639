"""``LLM``: the Python entry point, shaped like vLLM's (``LLM(model=...).generate(prompts, params)``).

Also ``create_engine``: the one place that wires the control plane's builder to an engine (the engine
only knows its remote-KV port, never the control plane).
"""

from __future__ import annotations

import functools
from dataclasses import fields

from tqdm import tqdm

from shadowserve.config import CodecConfig, DataPlaneConfig, EngineConfig
from shadowserve.controlplane.builder import engine_kv_manager
from shadowserve.engine.engine import LLMEngine
from shadowserve.engine.request import RequestOutput, SamplingParams
from shadowserve.errors import ConfigError
from shadowserve.kvcache.levels import DEFAULT_QUALITY, QUALITY_LEVELS, codec_for_quality
from shadowserve.model.loader import LoadedModel


def create_engine(
    config: EngineConfig,
    loaded: LoadedModel | None = None,
    progress: bool = True,
    dataplane: DataPlaneConfig | None = None,
    store_url: str | None = None,
    codec: CodecConfig | None = None,
) -> LLMEngine:
    """An engine whose prefixes come from ``store_url`` through a data plane, unless it recomputes.

    With no store URL or fetch mode ``recompute`` the engine computes every prefix itself. Without a
    ``codec`` the default quality level's is used.
    """
    dataplane = dataplane or DataPlaneConfig(fetch_mode="recompute")
    remote_kv = None
    if store_url is not None and dataplane.fetch_mode != "recompute":
        remote_kv = functools.partial(engine_kv_manager, dataplane, store_url,
                                      codec or QUALITY_LEVELS[DEFAULT_QUALITY])
    return LLMEngine(config, loaded, progress, dataplane, remote_kv)


class LLM:
    """Offline batched generation on one engine, optionally with a shared remote KV store.

    ``LLM("smollm2-135m", store="shadowserve://127.0.0.1:7480", fetch_mode="offload")`` looks up every
    prompt's prefix in the store, fetches what it holds through the data plane, and saves the rest.
    ``kv_quality`` (lossless | high | balanced | compact) picks the KV codec by name; ``codec`` gives a
    CodecConfig instead, for experts. Keyword options go to EngineConfig or DataPlaneConfig by name.
    """

    def __init__(
        self,
        model: str = "smollm2-135m",
        store: str | None = None,
        fetch_mode: str = "offload",
        codec: CodecConfig | None = None,
        kv_quality: str | None = None,
        progress: bool = True,
        **options,
    ) -> None:
        if codec is not None and kv_quality is not None:
            raise ConfigError("give kv_quality or codec, not both")
        codec = codec or codec_for_quality(kv_quality or DEFAULT_QUALITY)
        engine_fields = {f.name for f in fields(EngineConfig)}
        plane_fields = {f.name for f in fields(DataPlaneConfig)} - {"fetch_mode"}
        unknown = set(options) - engine_fields - plane_fields
        if unknown:
            raise ConfigError(f"unknown LLM option(s): {', '.join(sorted(unknown))}")
        self.config = EngineConfig(model=model, **{k: v for k, v in options.items() if k in engine_fields})
        self.dataplane_config = DataPlaneConfig(
            fetch_mode=fetch_mode if store else "recompute",
            **{k: v for k, v in options.items() if k in plane_fields},
        )
        self.engine = create_engine(self.config, progress=progress, dataplane=self.dataplane_config,
                                    store_url=store, codec=codec)
        self.tokenizer = self.engine.tokenizer

    def generate(
        self,
        prompts: str | list[str] | list[list[int]],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Generate for every prompt (text or token ids), batched; outputs come back in prompt order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        params = sampling_params or SamplingParams()
        per_prompt = params if isinstance(params, list) else [params] * len(prompts)
        if len(per_prompt) != len(prompts):
            raise ConfigError("sampling_params must be one object or one per prompt")
        reqs = [self.engine.add_request(p, sp) for p, sp in zip(prompts, per_prompt)]
        order = {r.request_id: i for i, r in enumerate(reqs)}
        results: list[RequestOutput | None] = [None] * len(reqs)
        bar = None
        if use_tqdm:
            bar = tqdm(total=len(reqs), desc="generating", unit="req")
        while self.engine.has_unfinished():
            for out in self.engine.step():
                results[order[out.request_id]] = out
                if bar:
                    bar.update(1)
        if bar:
            bar.close()
        return results  # type: ignore[return-value]

    def flush(self, timeout: float = 60.0) -> None:
        """Wait for pending saves to reach the store."""
        self.engine.flush(timeout)

    def close(self) -> None:
        self.engine.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
