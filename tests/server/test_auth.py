"""``--api-key``: /v1 needs the bearer key; /health and /metrics stay open for probes and scrapers."""

from __future__ import annotations

from fastapi.testclient import TestClient

from shadowserve.config import EngineConfig, ServerConfig
from shadowserve.engine.engine import LLMEngine
from shadowserve.server.openai_api import OpenAIServer


def test_api_key_is_required_on_v1_only(tiny):
    engine = LLMEngine(EngineConfig(model="tiny-random", max_model_len=256), loaded=tiny, progress=False)
    server = OpenAIServer(engine, ServerConfig(api_key="s3cret", served_model_name="tiny"))
    with TestClient(server.app) as c:
        r = c.post("/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        r = c.post("/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2},
                   headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401
        r = c.post("/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2},
                   headers={"Authorization": "Bearer s3cret"})
        assert r.status_code == 200 and r.json()["model"] == "tiny"
        assert c.get("/health").status_code == 200
        assert c.get("/metrics").status_code == 200
    assert not server.loop.alive  # shutting the app down stops the engine thread
