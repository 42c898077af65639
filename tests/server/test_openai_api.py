"""The official ``openai`` client against a live server: completions, chat, streaming, concurrency."""

from __future__ import annotations

import asyncio

import pytest

from shadowserve.engine.request import SamplingParams
from tests.server.conftest import scrape

openai = pytest.importorskip("openai", reason="the openai client is a test dependency")


@pytest.fixture(scope="module")
def client(api_server):
    return openai.OpenAI(base_url=f"{api_server.url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def reference():
    """The same model in-process: HTTP answers must equal what the engine itself generates."""
    from shadowserve.llm import LLM

    llm = LLM("tiny-random", progress=False, max_model_len=512)
    yield llm
    llm.close()


def test_models_lists_the_served_model(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny-random"]


def test_completion_equals_in_process_generation(client, reference):
    prompt = "The quick brown fox jumps over the lazy dog."
    r = client.completions.create(model="tiny-random", prompt=prompt, max_tokens=12, temperature=0)
    expected = reference.generate(prompt, SamplingParams(max_tokens=12))[0]
    assert r.choices[0].text == expected.text
    assert r.choices[0].finish_reason in ("length", "stop")
    assert r.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert r.usage.completion_tokens == len(expected.token_ids)


def test_token_id_prompts_and_batched_prompts(client, reference):
    ids = reference.tokenizer.encode("Token ids in, text out.")
    r = client.completions.create(model="tiny-random", prompt=[ids, ids[:5]], max_tokens=6, temperature=0)
    assert [c.index for c in r.choices] == [0, 1]
    expected = reference.generate([ids, ids[:5]], SamplingParams(max_tokens=6))
    assert [c.text for c in r.choices] == [e.text for e in expected]


def test_streaming_deltas_add_up_to_the_whole_answer(client):
    prompt = "Streaming should give the same text as a plain request."
    whole = client.completions.create(model="tiny-random", prompt=prompt, max_tokens=16, temperature=0)
    pieces, finish = [], None
    stream = client.completions.create(model="tiny-random", prompt=prompt, max_tokens=16, temperature=0,
                                       stream=True, stream_options={"include_usage": True})
    usage = None
    for event in stream:
        if event.usage:
            usage = event.usage
        for c in event.choices:
            pieces.append(c.text)
            finish = c.finish_reason or finish
    assert "".join(pieces) == whole.choices[0].text
    assert finish == whole.choices[0].finish_reason
    assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens


def test_chat_uses_the_chat_template_and_streams(client, reference):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello."}]
    r = client.chat.completions.create(model="tiny-random", messages=messages, max_tokens=10, temperature=0)
    text = reference.tokenizer.apply_chat_template(messages)
    expected = reference.generate(text, SamplingParams(max_tokens=10))[0]
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == expected.text
    assert r.usage.prompt_tokens == len(expected.prompt_token_ids)
    stream = client.chat.completions.create(model="tiny-random", messages=messages, max_tokens=10,
                                            temperature=0, stream=True)
    deltas = [c.delta for e in stream for c in e.choices]
    assert deltas[0].role == "assistant"
    assert "".join(d.content or "" for d in deltas) == expected.text


def test_seeded_sampling_is_reproducible_and_n_gives_n_choices(client):
    kw = dict(model="tiny-random", prompt="Sample me.", max_tokens=8, temperature=1.0, seed=7, n=3)
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert sorted(c.index for c in a.choices) == [0, 1, 2]


def test_stop_string_cuts_the_text(client):
    base = client.completions.create(model="tiny-random", prompt="Stop strings.", max_tokens=20, temperature=0)
    text = base.choices[0].text
    stop = text[5:7]
    assert stop, "the reference answer is too short to pick a stop string from"
    r = client.completions.create(model="tiny-random", prompt="Stop strings.", max_tokens=20, temperature=0,
                                  stop=[stop])
    assert r.choices[0].text == text[: text.find(stop)]
    assert r.choices[0].finish_reason == "stop"
    pieces = [c.text for e in client.completions.create(model="tiny-random", prompt="Stop strings.", max_tokens=20,
                                                          temperature=0, stop=[stop], stream=True)
              for c in e.choices]
    assert "".join(pieces) == r.choices[0].text


def test_sixteen_concurrent_requests_all_complete(api_server, reference):
    before = scrape(api_server.url).get('shadowserve_requests_total{state="finished"}', 0.0)

    async def main():
        client = openai.AsyncOpenAI(base_url=f"{api_server.url}/v1", api_key="unused", max_retries=0, timeout=120)
        prompts = [f"Request number {i} asks for a few tokens." for i in range(20)]
        calls = [client.completions.create(model="tiny-random", prompt=p, max_tokens=8, temperature=0)
                 for p in prompts[:10]]
        calls += [client.chat.completions.create(model="tiny-random", max_tokens=8, temperature=0, stream=False,
                                                 messages=[{"role": "user", "content": p}]) for p in prompts[10:]]
        results = await asyncio.gather(*calls)
        await client.close()
        return prompts, results

    prompts, results = asyncio.run(main())
    expected = reference.generate(prompts[:10], SamplingParams(max_tokens=8))
    assert [r.choices[0].text for r in results[:10]] == [e.text for e in expected]
    assert all(r.choices[0].message.content is not None for r in results[10:])
    after = scrape(api_server.url)['shadowserve_requests_total{state="finished"}']
    assert after - before >= 20
