"""``LLM``: the Python entry point, shaped like vLLM's (``LLM(model=...).generate(prompts, params)``)."""

from __future__ import annotations

from dataclasses import fields

from shadowserve.config import EngineConfig
from shadowserve.engine.engine import LLMEngine
from shadowserve.engine.sequence import RequestOutput, SamplingParams
from shadowserve.errors import ConfigError


class LLM:
    """Offline batched generation on one engine."""

    def __init__(self, model: str = "smollm2-135m", progress: bool = True, **engine_options) -> None:
        known = {f.name for f in fields(EngineConfig)}
        unknown = set(engine_options) - known
        if unknown:
            raise ConfigError(f"unknown LLM option(s): {', '.join(sorted(unknown))}")
        self.config = EngineConfig(model=model, **engine_options)
        self.engine = LLMEngine(self.config, progress=progress)
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
            from tqdm import tqdm

            bar = tqdm(total=len(reqs), desc="generating", unit="req")
        while self.engine.has_unfinished():
            for out in self.engine.step():
                results[order[out.request_id]] = out
                if bar:
                    bar.update(1)
        if bar:
            bar.close()
        return results  # type: ignore[return-value]

    def close(self) -> None:
        self.engine.close()
