"""The HTTP driver: sends specs to a running ``shadowserve serve`` (or any OpenAI-compatible server)
as streaming ``/v1/completions`` requests and records when each token's event arrived."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable

from shadowserve.bench.drivers import Driver, RequestRecord, RequestSpec


class HttpDriver(Driver):
    """Token ids in, SSE out; output lengths are exact (``ignore_eos``) like the in-process driver's."""

    def __init__(self, base_url: str, model: str | None = None, timeout: float = 3600.0,
                 api_key: str | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.timeout = timeout
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def run(self, specs: list[RequestSpec], max_concurrency: int | None = None,
            progress: Callable[[], None] | None = None) -> list[RequestRecord]:
        return asyncio.run(self._run(specs, max_concurrency, progress))

    async def _run(self, specs, max_concurrency, progress) -> list[RequestRecord]:
        import httpx

        limit = asyncio.Semaphore(max_concurrency or len(specs) or 1)
        limits = httpx.Limits(max_connections=max_concurrency or len(specs) or 1, max_keepalive_connections=64)
        async with httpx.AsyncClient(base_url=self.base_url, timeout=self.timeout, limits=limits,
                                     headers=self.headers) as client:
            t0 = time.perf_counter()

            async def one(spec: RequestSpec) -> RequestRecord:
                await asyncio.sleep(max(0.0, t0 + spec.arrival_s - time.perf_counter()))
                async with limit:
                    rec = RequestRecord(start=max(time.perf_counter(), t0 + spec.arrival_s),
                                        prompt_tokens=len(spec.prompt_ids))
                    try:
                        await self._send(client, spec, rec)
                    except Exception as exc:  # a failed request is a record, not a crashed run
                        rec.ok, rec.error = False, f"{type(exc).__name__}: {exc}"
                    rec.end = time.perf_counter()
                if progress:
                    progress()
                return rec

            return list(await asyncio.gather(*(one(s) for s in specs)))

    async def _send(self, client, spec: RequestSpec, rec: RequestRecord) -> None:
        body = {"prompt": list(spec.prompt_ids), "max_tokens": spec.max_tokens, "temperature": 0,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        if self.model:
            body["model"] = self.model
        async with client.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                text = (await r.aread()).decode(errors="replace")
                raise RuntimeError(f"HTTP {r.status_code}: {text[:200]}")
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                event = json.loads(data)
                now = time.perf_counter()
                if "error" in event:
                    raise RuntimeError(event["error"].get("message", "stream error"))
                if event.get("choices"):
                    rec.token_times.append(now)
                    if rec.first_token is None:
                        rec.first_token = now
                usage = event.get("usage")
                if usage:
                    rec.output_tokens = usage["completion_tokens"]
                    details = usage.get("prompt_tokens_details") or {}
                    rec.fetched_tokens = details.get("cached_tokens") or 0
        if rec.first_token is None:
            raise RuntimeError("the stream ended without a token")
        if not rec.output_tokens:
            rec.output_tokens = len(rec.token_times)
