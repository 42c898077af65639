"""Bad input gets a clear 4xx and the server keeps serving; a client that leaves frees its blocks."""

from __future__ import annotations

import json
import socket
import time
import urllib.parse

import httpx
import pytest

from tests.server.conftest import MAX_MODEL_LEN, scrape


@pytest.fixture(scope="module")
def http(api_server):
    with httpx.Client(base_url=api_server.url, timeout=60) as c:
        yield c


def _error(r: httpx.Response, status: int) -> str:
    assert r.status_code == status, r.text
    body = r.json()["error"]
    assert body["message"] and body["type"]
    return body["message"]


def _still_serving(http: httpx.Client) -> None:
    r = http.post("/v1/completions", json={"model": "tiny-random", "prompt": "still here?", "max_tokens": 3})
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("length", "stop")


def test_malformed_json(http):
    r = http.post("/v1/completions", content=b'{"model": "tiny-random", "prompt": ',
                  headers={"content-type": "application/json"})
    assert "not valid JSON" in _error(r, 400)
    _still_serving(http)


def test_missing_and_wrong_typed_fields(http):
    assert "prompt" in _error(http.post("/v1/completions", json={"model": "tiny-random"}), 400)
    assert "messages" in _error(http.post("/v1/chat/completions", json={"model": "tiny-random", "messages": []}), 400)
    assert "temperature" in _error(http.post("/v1/completions", json={"prompt": "x", "temperature": "hot"}), 400)
    assert "not supported" in _error(http.post("/v1/completions", json={"prompt": "x", "logprobs": 2}), 400)
    assert "token ids" in _error(http.post("/v1/completions", json={"prompt": [1, 2, 10**9]}), 400)
    _still_serving(http)


def test_unknown_model(http):
    r = http.post("/v1/completions", json={"model": "gpt-7", "prompt": "x"})
    assert "gpt-7" in _error(r, 404)
    assert r.json()["error"]["code"] == "model_not_found"


@pytest.mark.parametrize("max_tokens", [-5, 0])
def test_non_positive_max_tokens(http, max_tokens):
    assert "max_tokens" in _error(http.post("/v1/completions", json={"prompt": "x", "max_tokens": max_tokens}), 400)


def test_huge_max_tokens(http):
    r = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 10**9})
    assert "maximum context length" in _error(r, 400)
    assert r.json()["error"]["param"] == "max_tokens"


def test_prompt_over_the_context(http):
    r = http.post("/v1/completions", json={"prompt": [7] * (MAX_MODEL_LEN + 50), "max_tokens": 1})
    assert "shorten the prompt" in _error(r, 400)
    _still_serving(http)


def test_oversized_body(http):
    r = http.post("/v1/completions", json={"prompt": "x" * 100_000, "max_tokens": 1})
    assert _error(r, 413)
    _still_serving(http)


def test_oversized_chunked_body_is_cut_off(http):
    def body():
        yield b'{"prompt": "'
        for _ in range(100):
            yield b"y" * 1024
        yield b'"}'

    r = http.post("/v1/completions", content=body(), headers={"content-type": "application/json"})
    assert _error(r, 413)


def _wait_idle(url: str, timeout: float = 20.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        m = scrape(url)
        busy = sum(m.get(f'shadowserve_requests_in_state{{state="{s}"}}', 0) for s in ("waiting", "fetching", "running"))
        if (busy == 0 and m["shadowserve_kv_blocks_used"] == 0) or time.monotonic() > deadline:
            return m
        time.sleep(0.1)


def test_client_that_disconnects_mid_stream_frees_its_blocks(api_server, http):
    before = scrape(api_server.url).get('shadowserve_requests_total{state="aborted"}', 0.0)
    url = urllib.parse.urlsplit(api_server.url)
    body = json.dumps({"prompt": "Keep talking for a long time.", "max_tokens": 400, "stream": True,
                       "ignore_eos": True}).encode()
    request = (f"POST /v1/completions HTTP/1.1\r\nHost: {url.netloc}\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    with socket.create_connection((url.hostname, url.port)) as sock:
        sock.sendall(request)
        received = b""
        while received.count(b"data: ") < 3:
            received += sock.recv(4096)
        # The request is mid-generation now: it holds KV blocks.
        assert scrape(api_server.url)["shadowserve_kv_blocks_used"] > 0
    m = _wait_idle(api_server.url)
    assert m["shadowserve_kv_blocks_used"] == 0
    assert m['shadowserve_requests_total{state="aborted"}'] == before + 1
    _still_serving(http)


def test_client_that_disconnects_from_a_plain_request_frees_its_blocks(api_server, http):
    before = scrape(api_server.url)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{api_server.url}/v1/completions", timeout=0.2,
                   json={"prompt": "Long answer please.", "max_tokens": 480, "ignore_eos": True})
    m = _wait_idle(api_server.url)
    assert m["shadowserve_kv_blocks_used"] == 0
    finished = m['shadowserve_requests_total{state="finished"}'] - before['shadowserve_requests_total{state="finished"}']
    aborted = m['shadowserve_requests_total{state="aborted"}'] - before.get('shadowserve_requests_total{state="aborted"}', 0)
    assert (finished, aborted) == (0, 1), "the request ran to the end instead of being aborted"
    _still_serving(http)


def test_health_is_ok(http):
    assert http.get("/health").json() == {"status": "ok"}
