"""The OpenAI-compatible HTTP API: /v1/completions, /v1/chat/completions, /v1/models, /health, /metrics.

Handlers validate and tokenize, submit to the engine thread (``EngineLoop``) and await its events;
they never run a model step. A client that disconnects has its requests aborted, which frees their
KV blocks. Errors use OpenAI's body shape ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from shadowserve.config import ServerConfig
from shadowserve.engine.engine import LLMEngine
from shadowserve.engine.request import SamplingParams
from shadowserve.errors import ConfigError
from shadowserve.server.body_limit import BodyLimitMiddleware
from shadowserve.server.choices import Choice
from shadowserve.server.engine_loop import EngineLoop, Event, asyncio_sink
from shadowserve.server.health import degraded_reasons, unhealthy_reason
from shadowserve.server.metrics import CONTENT_TYPE, ServerMetrics
from shadowserve.server.protocol import ChatCompletionRequest, CompletionRequest
from shadowserve.values import parse_size


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def error_response(status: int, message: str, type_: str = "invalid_request_error",
                   param: str | None = None, code: str | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


@dataclass
class _Job:
    """One HTTP request's engine requests (one per prompt x n) and their shared event queue."""

    choices: list[Choice]
    events: asyncio.Queue
    created: int
    response_id: str
    backlog: deque = field(default_factory=deque)  # events that arrived while waiting for acceptance

    async def next_event(self) -> tuple[int, Event]:
        return self.backlog.popleft() if self.backlog else await self.events.get()


class OpenAIServer:
    """Owns the engine loop and metrics; ``app`` is the ASGI application."""

    def __init__(self, engine: LLMEngine, config: ServerConfig, close_engine: bool = True) -> None:
        self.engine = engine
        self.config = config
        self.model_name = config.served_model_name or engine.config.model
        self.max_model_len = engine.max_model_len
        self.metrics = ServerMetrics(engine)
        self.loop = EngineLoop(engine, on_finish=self.metrics.observe_finished,
                               on_abort=lambda: self.metrics.observe_outcome("aborted"))
        self._close_engine = close_engine
        self.app = self._build_app()

    # ---- app wiring ----------------------------------------------------------------------------

    def _build_app(self) -> FastAPI:
        @asynccontextmanager
        async def lifespan(app: FastAPI):
            self.loop.start()
            try:
                yield
            finally:
                await asyncio.get_running_loop().run_in_executor(None, self.shutdown)

        app = FastAPI(title="ShadowServe", lifespan=lifespan, docs_url=None, redoc_url=None)
        app.add_middleware(BodyLimitMiddleware, limit=parse_size(self.config.max_request_size))

        @app.exception_handler(RequestValidationError)
        async def invalid(request: Request, exc: RequestValidationError):
            self.metrics.observe_outcome("rejected")
            return error_response(400, _validation_message(exc), param=_validation_param(exc))

        @app.exception_handler(APIError)
        async def api_error(request: Request, exc: APIError):
            if exc.status < 500:
                self.metrics.observe_outcome("rejected")
            return error_response(exc.status, exc.message, exc.type, exc.param, exc.code)

        @app.exception_handler(StarletteHTTPException)
        async def http_error(request: Request, exc: StarletteHTTPException):
            return error_response(exc.status_code, str(exc.detail), "invalid_request_error")

        @app.get("/health")
        async def health():
            reason = unhealthy_reason(self.loop, self.engine)
            if reason:
                return JSONResponse({"status": "unavailable", "reason": reason}, status_code=503)
            reasons = degraded_reasons(self.engine)
            if reasons:  # still 200: requests are served, by recompute where the store cannot help
                return {"status": "degraded", "reasons": reasons}
            return {"status": "ok"}

        @app.get("/metrics")
        async def metrics():
            return Response(self.metrics.render(), media_type=CONTENT_TYPE)

        @app.get("/v1/models")
        async def models(request: Request):
            self._authorize(request)
            return {"object": "list", "data": [{
                "id": self.model_name, "object": "model", "created": 0, "owned_by": "shadowserve",
                "max_model_len": self.max_model_len,
            }]}

        @app.post("/v1/completions")
        async def completions(body: CompletionRequest, request: Request):
            self._authorize(request)
            self._check_model(body.model)
            prompts = [self._tokenize_prompt(p) for p in body.prompts()]
            job = await self._start(prompts, body, body.max_tokens, "cmpl")
            if body.stream:
                return _sse(self._stream(job, request, body, chat=False))
            return await self._complete(job, request, chat=False)

        @app.post("/v1/chat/completions")
        async def chat(body: ChatCompletionRequest, request: Request):
            self._authorize(request)
            self._check_model(body.model)
            messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                        for m in body.messages]
            try:
                text = self.engine.tokenizer.apply_chat_template(messages)
            except Exception as exc:  # a template error is the messages' fault (e.g. roles out of order)
                raise APIError(400, f"the chat template rejected these messages: {exc}", param="messages") from None
            job = await self._start([self.engine.tokenizer.encode(text)], body, body.requested_max_tokens, "chatcmpl")
            if body.stream:
                return _sse(self._stream(job, request, body, chat=True))
            return await self._complete(job, request, chat=True)

        return app

    def shutdown(self) -> None:
        self.loop.stop()
        if self._close_engine:
            self.engine.close()

    # ---- request checks --------------------------------------------------------------------------

    def _authorize(self, request: Request) -> None:
        key = self.config.api_key
        if key and request.headers.get("authorization", "") != f"Bearer {key}":
            raise APIError(401, "missing or wrong API key", "authentication_error", code="invalid_api_key")

    def _check_model(self, model: str | None) -> None:
        if model not in (None, self.model_name, self.engine.config.model):
            raise APIError(404, f"the model {model!r} does not exist; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")

    def _tokenize_prompt(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            ids = self.engine.tokenizer.encode(prompt)
        else:
            vocab = self.engine.loaded.arch.vocab_size
            if any(t < 0 or t >= vocab for t in prompt):
                raise APIError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
            ids = list(prompt)
        if not ids:
            raise APIError(400, "the prompt is empty", param="prompt")
        return ids

    def _sampling(self, body, prompt_len: int, max_tokens: int | None, index: int) -> SamplingParams:
        room = self.max_model_len - prompt_len
        if room <= 0:
            raise APIError(400, f"This model's maximum context length is {self.max_model_len} tokens, but the "
                                f"prompt has {prompt_len} tokens. Please shorten the prompt.", param="prompt",
                           code="context_length_exceeded")
        if max_tokens is None:
            max_tokens = room
        elif max_tokens > room:
            raise APIError(400, f"This model's maximum context length is {self.max_model_len} tokens; the prompt "
                                f"has {prompt_len} tokens, so max_tokens may be at most {room} (got {max_tokens}).",
                           param="max_tokens", code="context_length_exceeded")
        seed = None if body.seed is None else body.seed + index
        try:
            return SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                                  top_k=body.top_k, seed=seed, ignore_eos=body.ignore_eos,
                                  stop_token_ids=tuple(body.stop_token_ids or ()),
                                  cache_salt=body.cache_salt)
        except ConfigError as exc:
            raise APIError(400, str(exc)) from None

    # ---- running requests ------------------------------------------------------------------------

    async def _start(self, prompts: list[list[int]], body, max_tokens: int | None, kind: str) -> _Job:
        if body.n > self.config.max_n:
            raise APIError(400, f"n may be at most {self.config.max_n}", param="n")
        if not self.loop.alive:
            raise APIError(503, self.loop.fatal or "the engine loop is not running", "server_error")
        response_id = f"{kind}-{uuid.uuid4().hex}"
        events: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        choices: list[Choice] = []
        for p_index, ids in enumerate(prompts):
            for k in range(body.n):
                index = p_index * body.n + k
                params = self._sampling(body, len(ids), max_tokens, index)
                choices.append(Choice(index, f"{response_id}-{index}", ids, body.stops, params))
        for c in choices:
            sink = asyncio_sink(loop, events)
            self.loop.submit(c.request_id, c.prompt_token_ids, c.params,
                             lambda ev, i=c.index, sink=sink: sink((i, ev)))
        job = _Job(choices, events, int(time.time()), response_id)
        accepted = 0
        try:
            while accepted < len(choices):
                index, ev = await events.get()
                if ev.kind == "error":
                    raise APIError(400 if ev.client_error else 500, ev.error or "request failed",
                                   "invalid_request_error" if ev.client_error else "server_error")
                if ev.kind == "accepted":
                    accepted += 1
                else:
                    job.backlog.append((index, ev))  # a token that raced ahead of another acceptance
        except BaseException:
            self._abort(job)
            raise
        return job

    def _abort(self, job: _Job) -> None:
        for c in job.choices:
            if not c.finished:
                self.loop.abort(c.request_id)

    def _apply(self, job: _Job, index: int, ev: Event) -> None:
        choice = job.choices[index]
        decode = self.engine.tokenizer.decode
        if ev.kind == "token" and ev.token_id is not None:
            if choice.add_token(ev.token_id, decode):
                self.loop.abort(choice.request_id)  # a stop string ended it: free its blocks now
        elif ev.kind == "finished" and ev.output is not None:
            choice.finish(ev.output, decode)
        elif ev.kind == "error":
            raise APIError(500, ev.error or "request failed", "server_error")

    async def _complete(self, job: _Job, request: Request, chat: bool) -> JSONResponse:
        watcher = asyncio.create_task(_watch_disconnect(request, job))
        try:
            while not all(c.finished for c in job.choices):
                index, ev = await job.next_event()
                if index < 0:  # the client is gone: stop generating for it
                    self._abort(job)
                    return JSONResponse({}, status_code=499)
                self._apply(job, index, ev)
        except BaseException:
            self._abort(job)
            raise
        finally:
            watcher.cancel()
        choices = []
        for c in job.choices:
            if chat:
                choices.append({"index": c.index, "message": {"role": "assistant", "content": c.text},
                                "logprobs": None, "finish_reason": c.finish_reason})
            else:
                choices.append({"index": c.index, "text": c.text, "logprobs": None,
                                "finish_reason": c.finish_reason})
        return JSONResponse({
            "id": job.response_id, "object": "chat.completion" if chat else "text_completion",
            "created": job.created, "model": self.model_name, "choices": choices,
            "usage": _usage(job), "shadowserve": _extras(job),
        })

    async def _stream(self, job: _Job, request: Request, body, chat: bool) -> AsyncIterator[str]:
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(choice: Choice, delta: str, finish: str | None, first: bool = False) -> str:
            if chat:
                d = {"role": "assistant", "content": delta} if first else ({"content": delta} if delta else {})
                c = {"index": choice.index, "delta": d, "logprobs": None, "finish_reason": finish}
            else:
                c = {"index": choice.index, "text": delta, "logprobs": None, "finish_reason": finish}
            payload = {"id": job.response_id, "object": obj, "created": job.created, "model": self.model_name,
                       "choices": [c]}
            return f"data: {json.dumps(payload)}\n\n"

        done = False
        try:
            if chat:
                for c in job.choices:
                    yield chunk(c, "", None, first=True)
            announced: set[int] = set()
            while not all(c.index in announced for c in job.choices):
                index, ev = await job.next_event()
                try:
                    self._apply(job, index, ev)
                except APIError as exc:
                    yield f"data: {json.dumps({'error': {'message': exc.message, 'type': exc.type}})}\n\n"
                    break
                c = job.choices[index]
                if c.index in announced:
                    continue
                delta = c.take_delta()
                if c.finished:
                    announced.add(c.index)
                    yield chunk(c, delta, c.finish_reason)
                elif delta:
                    yield chunk(c, delta, None)
            if body.stream_options and body.stream_options.include_usage:
                payload = {"id": job.response_id, "object": obj, "created": job.created, "model": self.model_name,
                           "choices": [], "usage": _usage(job)}
                yield f"data: {json.dumps(payload)}\n\n"
            yield "data: [DONE]\n\n"
            done = True
        finally:
            if not done:
                self._abort(job)  # the client went away (or the stream failed): free the KV blocks


async def _watch_disconnect(request: Request, job: _Job) -> None:
    """Wake the handler the moment the client hangs up (the body is already read, so receive() waits)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            job.events.put_nowait((-1, Event("disconnected")))
            return


def _sse(gen: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(gen, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _usage(job: _Job) -> dict:
    prompt = sum(len(c.prompt_token_ids) for c in job.choices)
    completion = sum(len(c.token_ids) for c in job.choices)
    cached = sum((c.output.num_cached_tokens + c.output.num_fetched_tokens) if c.output else 0 for c in job.choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def _extras(job: _Job) -> dict:
    """ShadowServe's own per-response numbers: where the prompt's KV came from, and latency."""
    outs = [c.output for c in job.choices if c.output is not None]
    return {
        "fetched_tokens": sum(o.num_fetched_tokens for o in outs),
        "local_cached_tokens": sum(o.num_cached_tokens for o in outs),
        "ttft_ms": [o.ttft_ms for o in outs],
        "kv_decision": [o.kv_decision for o in outs],  # fetch | partial | recompute, why, predicted TTFTs
        "fetch_ms": [o.fetch_ms for o in outs],  # of each choice's TTFT, the part spent fetching its prefix
    }


def _validation_message(exc: RequestValidationError) -> str:
    errors = exc.errors()
    if not errors:
        return "invalid request"
    first = errors[0]
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON"
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    return f"{where}: {msg}" if where else msg


def _validation_param(exc: RequestValidationError) -> str | None:
    errors = exc.errors()
    if not errors or errors[0].get("type") == "json_invalid":
        return None
    loc = [str(p) for p in errors[0].get("loc", ()) if p != "body"]
    return loc[0] if loc else None
