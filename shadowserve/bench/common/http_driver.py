"""The HTTP driver: sends request specs to an OpenAI-compatible server (``shadowserve serve``) as
streaming ``/v1/completions`` calls, one thread per request in flight, and times every SSE chunk.

As in ``vllm bench serve``, the ITL is the gap between streamed chunks; the output token count
comes from the final usage chunk, so TPOT stays per token even when a chunk carries several.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
import urllib.parse
from collections.abc import Callable

from shadowserve.bench.common.drivers import Driver, RequestRecord, RequestSpec


class HTTPDriver(Driver):
    def __init__(self, base_url: str, model: str | None = None, timeout: float = 600.0,
                 api_key: str | None = None) -> None:
        u = urllib.parse.urlsplit(base_url)
        if u.scheme != "http" or not u.hostname:
            raise ValueError(f"expected http://host:port, got {base_url!r}")
        self.host, self.port = u.hostname, u.port or 80
        self.timeout = timeout
        self.headers = {"Content-Type": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self.model = model or self._first_model()

    def _first_model(self) -> str:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            conn.request("GET", "/v1/models", headers=self.headers)
            return json.loads(conn.getresponse().read())["data"][0]["id"]
        finally:
            conn.close()

    def run(self, specs: list[RequestSpec], max_concurrency: int | None = None,
            progress: Callable[[], None] | None = None) -> list[RequestRecord]:
        """Each request is sent at its arrival time, or when the concurrency limit lets it go."""
        slots = threading.BoundedSemaphore(max_concurrency) if max_concurrency else None
        records: list[RequestRecord | None] = [None] * len(specs)
        workers = []
        t0 = time.perf_counter()
        for i in sorted(range(len(specs)), key=lambda i: specs[i].arrival_s):
            due = t0 + specs[i].arrival_s
            time.sleep(max(0.0, due - time.perf_counter()))
            if slots is not None:
                slots.acquire()
            start = max(due, time.perf_counter()) if slots is not None else due

            def work(i: int = i, start: float = start) -> None:
                try:
                    records[i] = self._one(specs[i], start)
                finally:
                    if slots is not None:
                        slots.release()
                    if progress:
                        progress()

            t = threading.Thread(target=work, daemon=True)
            t.start()
            workers.append(t)
        for t in workers:
            t.join()
        return [r for r in records if r is not None]

    def _one(self, spec: RequestSpec, start: float) -> RequestRecord:
        rec = RequestRecord(start=start, prompt_tokens=len(spec.prompt_ids))
        body = json.dumps({"model": self.model, "prompt": list(spec.prompt_ids), "max_tokens": spec.max_tokens,
                           "temperature": 0.0, "ignore_eos": True, "stream": True,
                           "stream_options": {"include_usage": True}})
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            conn.request("POST", "/v1/completions", body=body, headers=self.headers)
            resp = conn.getresponse()
            if resp.status != 200:
                rec.ok, rec.error = False, f"HTTP {resp.status}: {resp.read()[:300]!r}"
                return rec
            usage_tokens = None
            for raw in resp:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                event = json.loads(data)
                now = time.perf_counter()
                if event.get("error"):
                    rec.ok, rec.error = False, str(event["error"])[:300]
                    break
                # A chunk carrying text is output arriving. The server streams only non-empty text, so
                # tokens that decode to nothing (a random model's) show up only in the finish chunk.
                choices = event.get("choices") or []
                if any(c.get("text") for c in choices) or (choices and not rec.token_times):
                    rec.token_times.append(now)
                if event.get("usage"):
                    usage_tokens = event["usage"].get("completion_tokens")
            rec.first_token = rec.token_times[0] if rec.token_times else None
            rec.end = rec.token_times[-1] if rec.token_times else time.perf_counter()
            rec.output_tokens = usage_tokens if usage_tokens is not None else len(rec.token_times)
            if rec.ok and not rec.token_times:
                rec.ok, rec.error = False, "no tokens streamed"
        except (OSError, http.client.HTTPException, json.JSONDecodeError) as exc:
            rec.ok, rec.error = False, f"{type(exc).__name__}: {exc}"
        finally:
            conn.close()
        if rec.end is None:
            rec.end = time.perf_counter()
        return rec
