"""``cache_salt`` over HTTP: two replicas on one store; a salt shares prefixes only with itself.

Replica one keeps its local prefix cache, so its hits are local; replica two has it off, so its
hits come from the store that replica one saved to. ``usage.prompt_tokens_details.cached_tokens``
counts both kinds; the ``shadowserve`` extras say which.
"""

from __future__ import annotations

import httpx
import pytest

from shadowserve.server.launch import start_api_server
from tests.server.conftest import scrape
from tests.server.test_prefix_fetch import _wait

CHUNK = 32
PROMPT = list(range(3, 3 + 150))  # token ids: four whole chunks, nine whole blocks and a tail


def _server(store_url: str, local_cache: bool):
    return start_api_server(
        "--model", "tiny-random", "--max-model-len", "512", "--store", store_url, "--fetch-mode", "sync",
        "--quant", "none", "--lossless", "zstd", "--set", f"dataplane.chunk_size={CHUNK}",
        "--set", f"engine.enable_prefix_caching={'true' if local_cache else 'false'}",
        "--set", "dataplane.fetch_policy=always",  # every store hit fetched: on tiny-random computing is as cheap
    )


@pytest.fixture(scope="module")
def replicas(tmp_path_factory):
    url = f"file://{tmp_path_factory.mktemp('salted-store')}"
    one = _server(url, local_cache=True)
    two = None
    try:
        two = _server(url, local_cache=False)
        yield one.url, two.url
    finally:
        one.stop()
        if two is not None:
            two.stop()


def _complete(base: str, salt: str | None, prompt=PROMPT, **extra) -> dict:
    body = {"prompt": prompt, "max_tokens": 4, "temperature": 0, **extra}
    if salt is not None:
        body["cache_salt"] = salt
    r = httpx.post(f"{base}/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def _cached(resp: dict) -> int:
    return resp["usage"]["prompt_tokens_details"]["cached_tokens"]


def test_salts_share_prefixes_only_with_themselves(replicas):
    one, two = replicas
    first = _complete(one, "alice")
    assert _cached(first) == 0
    assert _cached(_complete(one, "bob")) == 0  # alice's blocks are right there, but not bob's
    assert _cached(_complete(one, None)) == 0
    again = _complete(one, "alice")
    assert _cached(again) == again["shadowserve"]["local_cached_tokens"] == 144
    assert _cached(_complete(one, None)) == 144  # unsalted requests share, as they always did
    assert again["choices"][0]["text"] == first["choices"][0]["text"]
    # Replica two: nothing local, so every hit is a fetch from what replica one saved.
    _wait(lambda: scrape(one)["shadowserve_saved_chunks_total"] >= 3 * 4, what="replica one's saves")
    assert _cached(_complete(two, "carol")) == 0  # a tenant that never ran this prompt sees nothing
    fetched = _complete(two, "alice")
    assert _cached(fetched) == fetched["shadowserve"]["fetched_tokens"] == 128
    assert fetched["choices"][0]["text"] == first["choices"][0]["text"]
    assert _complete(two, None)["shadowserve"]["fetched_tokens"] == 128


def test_chat_requests_take_a_salt_too(replicas):
    one, _ = replicas
    messages = [{"role": "user", "content": "A long shared preamble that repeats. " * 8}]

    def chat(salt: str) -> int:
        r = httpx.post(f"{one}/v1/chat/completions", timeout=60,
                       json={"messages": messages, "max_tokens": 2, "cache_salt": salt})
        assert r.status_code == 200, r.text
        return _cached(r.json())

    assert chat("dave") == 0
    assert chat("erin") == 0
    assert chat("dave") > 0


@pytest.mark.parametrize("salt", ["", "s" * 129, 42, ["a"], {"k": "v"}])
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_bad_salts_get_a_400(replicas, salt, path):
    one, _ = replicas
    body = {"max_tokens": 1, "cache_salt": salt}
    body.update({"prompt": "x"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "x"}]})
    r = httpx.post(f"{one}{path}", json=body, timeout=30)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "cache_salt" and error["type"] == "invalid_request_error"
    assert "must be a non-empty string of at most 128 characters" in error["message"]


def test_null_salt_is_no_salt(replicas):
    one, _ = replicas
    prompt = list(range(200, 350))
    assert _cached(_complete(one, None, prompt, cache_salt=None)) == 0
    assert _cached(_complete(one, None, prompt)) == 144  # JSON null and no field: the same key space
