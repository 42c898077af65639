"""``LLM``: the Python entry point, shaped like vLLM's (``LLM(model=...).generate(prompts, params)``,
``.chat(messages)``), safe to use from a plain script: close() is optional, exit cleans up.

Also ``create_engine``: the one place that wires the control plane's builder to an engine (the engine
only knows its remote-KV port, never the control plane).
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import fields
from typing import Any

from tqdm import tqdm

from shadowserve.config import CodecConfig, DataPlaneConfig, EngineConfig
from shadowserve.controlplane.builder import engine_kv_manager
from shadowserve.engine.engine import LLMEngine
from shadowserve.engine.request import RequestOutput, SamplingParams
from shadowserve.errors import ConfigError
from shadowserve.kvcache.levels import DEFAULT_QUALITY, QUALITY_LEVELS, codec_for_quality
from shadowserve.model.loader import LoadedModel

CLOSE_FLUSH_TIMEOUT = 10.0  # seconds close() (or interpreter exit) waits for saves still on their way


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


CHAT_ROLES = {"system", "developer", "user", "assistant", "tool"}
Conversation = Sequence[Mapping[str, Any]]


def _message_text(i: int, msg: Any) -> dict[str, str]:
    """One chat message as the template wants it; ConfigError says what is wrong with a bad one."""
    if not isinstance(msg, Mapping):
        raise ConfigError(f"chat message {i} must be a dict with 'role' and 'content', got {type(msg).__name__}")
    role, content = msg.get("role"), msg.get("content")
    if role not in CHAT_ROLES:
        raise ConfigError(f"chat message {i} has role {role!r}; expected one of {', '.join(sorted(CHAT_ROLES))}")
    if isinstance(content, list):  # OpenAI-style content parts: text only
        if not all(isinstance(p, Mapping) and p.get("type") == "text" and isinstance(p.get("text"), str)
                   for p in content):
            raise ConfigError(f"chat message {i}: only text content parts ({{'type': 'text', 'text': ...}}) are supported")
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise ConfigError(f"chat message {i} needs 'content' as a string, got {type(content).__name__}")
    return {"role": "system" if role == "developer" else role, "content": content}


def _conversations(messages: Conversation | Sequence[Conversation]) -> list[list[dict[str, str]]]:
    """One conversation (a list of messages) or a list of them, checked, as a list of conversations."""
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence) or not messages:
        raise ConfigError("chat takes a non-empty list of messages, or a list of such lists")
    many = not isinstance(messages[0], Mapping)
    convs = messages if many else [messages]
    out = []
    for conv in convs:
        if isinstance(conv, (str, bytes, Mapping)) or not isinstance(conv, Sequence) or not conv:
            raise ConfigError("every conversation must be a non-empty list of {'role', 'content'} messages")
        out.append([_message_text(i, m) for i, m in enumerate(conv)])
    return out


def _shut_down(engine: LLMEngine, flush_timeout: float) -> None:
    """Let pending saves reach the store (bounded), then stop the data plane and free shared memory."""
    try:
        engine.flush(flush_timeout)
    finally:
        engine.close()


class LLM:
    """Offline batched generation on one engine, optionally with a shared remote KV store.

    ``LLM("smollm2-135m", store="shadowserve://127.0.0.1:7480", fetch_mode="offload")`` looks up every
    prompt's prefix in the store, fetches what it holds through the data plane, and saves the rest.
    ``kv_quality`` (lossless | high | balanced | compact) picks the KV codec by name; ``codec`` gives a
    CodecConfig instead, for experts. Keyword options go to EngineConfig or DataPlaneConfig by name.
    ``close()`` (or ``with``) frees the data plane and shared memory now; otherwise interpreter exit does.
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
        # A script that never calls close() still saves what it computed and leaves nothing behind.
        self._finalizer = weakref.finalize(self, _shut_down, self.engine, CLOSE_FLUSH_TIMEOUT)

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

    def chat(
        self,
        messages: Conversation | Sequence[Conversation],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        use_tqdm: bool = False,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        """Like vLLM's ``LLM.chat``: one conversation or a list of them, each a list of
        ``{"role", "content"}`` messages, rendered with the model's chat template and generated;
        one output per conversation, in order."""
        texts = []
        for conv in _conversations(messages):
            try:
                texts.append(self.tokenizer.apply_chat_template(conv, add_generation_prompt=add_generation_prompt))
            except Exception as exc:  # the template raised (roles out of order, ...): the messages' fault
                raise ConfigError(f"the chat template rejected these messages: {exc}") from exc
        return self.generate(texts, sampling_params, use_tqdm)

    def flush(self, timeout: float = 60.0) -> None:
        """Wait for pending saves to reach the store."""
        self.engine.flush(timeout)

    def close(self) -> None:
        """Wait (bounded) for pending saves, then stop the data plane and free the shared memory.
        Runs by itself at interpreter exit if never called."""
        self._finalizer()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
