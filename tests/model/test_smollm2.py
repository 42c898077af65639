"""The real SmolLM2-135M: tokenizer and greedy tokens against transformers' own GGUF loading."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.smollm2

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a land far away,",
    "<|im_start|>user\nWhat is 2+2? Answer in 12345 words.<|im_end|>\n<|im_start|>assistant\n",
]


@pytest.fixture(scope="module")
def hf_reference():
    transformers = pytest.importorskip("transformers")
    from shadowserve.model.weights_download import smollm2_gguf_path

    path = smollm2_gguf_path(progress=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return model, tok


def test_architecture(smollm2):
    arch = smollm2.arch
    assert (arch.num_hidden_layers, arch.num_key_value_heads, arch.head_dim) == (30, 3, 64)
    assert arch.tie_word_embeddings
    assert 2 in smollm2.tokenizer.eos_token_ids  # <|im_end|>


def test_tokenizer_matches_transformers(smollm2, hf_reference):
    _, tok = hf_reference
    from pydoc_data.topics import topics

    texts = PROMPTS + [topics["assert"][:2000], "  leading spaces, tabs\tand ünïcödé 🙂 123456789"]
    for text in texts:
        assert smollm2.tokenizer.encode(text) == tok(text)["input_ids"], text[:40]


def test_greedy_tokens_match_transformers(smollm2, hf_reference):
    from shadowserve.config import EngineConfig
    from shadowserve.engine.engine import LLMEngine
    from shadowserve.engine.request import SamplingParams

    model, _ = hf_reference
    engine = LLMEngine(EngineConfig(model="smollm2-135m", kv_cache_memory="256MiB"), loaded=smollm2)
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    reqs = [engine.add_request(p, params) for p in PROMPTS]
    while engine.has_unfinished():
        engine.step()
    for req in reqs:
        ids = torch.tensor([req.prompt_token_ids])
        with torch.no_grad():
            ref = model.generate(ids, max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert req.output_token_ids == ref[0, ids.shape[1]:].tolist(), req.prompt
    engine.close()


def test_batched_equals_one_at_a_time(smollm2):
    from shadowserve.config import EngineConfig
    from shadowserve.engine.engine import LLMEngine
    from shadowserve.engine.request import SamplingParams

    params = SamplingParams(max_tokens=12, ignore_eos=True)
    engine = LLMEngine(EngineConfig(model="smollm2-135m", kv_cache_memory="256MiB",
                                    enable_prefix_caching=False), loaded=smollm2)
    singles = []
    for p in PROMPTS:
        r = engine.add_request(p, params)
        while engine.has_unfinished():
            engine.step()
        singles.append(r.output_token_ids)
    batch = [engine.add_request(p, params) for p in PROMPTS]
    while engine.has_unfinished():
        engine.step()
    assert [r.output_token_ids for r in batch] == singles
    engine.close()
