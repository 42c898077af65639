"""One greedy ``/v1/completions`` call whose answer text is kept, so a run can check it, not just time it.

The load driver (http_driver.py) streams and times tokens; the soak benchmark needs the opposite:
the whole answer, what the server says it fetched, and a clear verdict when no answer came
(an HTTP error is ``failed``; silence past the timeout is ``hung``).
"""

from __future__ import annotations

import http.client
import json
import time
import urllib.parse
from dataclasses import dataclass


@dataclass
class Answer:
    """What one request got back; ``text`` is None unless the server answered 200."""

    start: float  # time.monotonic()
    seconds: float
    text: str | None = None
    fetched_tokens: int = 0
    error: str | None = None
    hung: bool = False


def complete(base_url: str, prompt_ids: list[int], max_tokens: int, timeout: float) -> Answer:
    """Send one non-streaming greedy request for exactly ``max_tokens`` tokens and wait for the answer."""
    u = urllib.parse.urlsplit(base_url)
    body = json.dumps({"prompt": list(prompt_ids), "max_tokens": max_tokens, "temperature": 0.0,
                       "ignore_eos": True})
    start = time.monotonic()
    ans = Answer(start, 0.0)
    conn = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=timeout)
    try:
        conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        data = resp.read()
        if resp.status != 200:
            ans.error = f"HTTP {resp.status}: {data[:200]!r}"
        else:
            reply = json.loads(data)
            ans.text = reply["choices"][0]["text"]
            ans.fetched_tokens = int((reply.get("shadowserve") or {}).get("fetched_tokens") or 0)
    except TimeoutError:
        ans.hung = True
        ans.error = f"no answer within {timeout:.0f}s"
    except (OSError, http.client.HTTPException, ValueError, KeyError, IndexError) as exc:
        ans.error = f"{type(exc).__name__}: {exc}"
    finally:
        conn.close()
    ans.seconds = time.monotonic() - start
    return ans


def scrape_metrics(base_url: str, timeout: float = 10.0) -> dict[str, float]:
    """``/metrics`` as {series with labels: value}."""
    u = urllib.parse.urlsplit(base_url)
    conn = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=timeout)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            try:
                out[name] = float(value)
            except ValueError:
                continue
    return out
