"""Our decoder against HF transformers' LlamaForCausalLM on the same (random) weights."""

from __future__ import annotations

import pytest
import torch

from shadowserve.engine.kv_pool import KVPool
from shadowserve.model.loader import load_model
from tests.model.helpers import decode_logits, prefill_logits

transformers = pytest.importorskip("transformers")


def _save_hf_checkpoint(path, **overrides):
    """A small random LlamaForCausalLM saved as safetensors, plus a minimal tokenizer.json."""
    from tokenizers import Tokenizer, models

    cfg = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
               rope_theta=10000.0, tie_word_embeddings=False)
    cfg.update(overrides)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).eval()
    hf.save_pretrained(path, safe_serialization=True)
    Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]")).save(str(path / "tokenizer.json"))
    return hf


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"tie_word_embeddings": True},
        {"num_key_value_heads": 4},  # plain multi-head attention
        {"rope_theta": 500000.0, "max_position_embeddings": 1024,
         "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 64}},
        {"rope_scaling": {"rope_type": "linear", "factor": 2.0}},
    ],
    ids=["gqa", "tied", "mha", "llama3-rope", "linear-rope"],
)
def test_logits_match_transformers(tmp_path, overrides):
    hf = _save_hf_checkpoint(tmp_path, **overrides)
    ours = load_model(str(tmp_path), "float32")
    ids = torch.randint(0, 300, (70,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids[None]).logits[0]

    pool = KVPool(ours.arch, 8, 16, torch.float32)
    full = prefill_logits(ours.model, pool, ids)
    torch.testing.assert_close(full, ref, atol=1e-4, rtol=1e-4)

    # Chunked: the first 40 tokens are already in the pool; prefill the rest against them.
    pool2 = KVPool(ours.arch, 8, 16, torch.float32)
    prefill_logits(ours.model, pool2, ids[:40])
    for as_view in (False, True):
        rest = prefill_logits(ours.model, pool2, ids, start=40, as_view=as_view)
        torch.testing.assert_close(rest[:-1], ref[40:-1], atol=1e-4, rtol=1e-4)

    # Decode path: the last token alone, attending over the pool.
    pool3 = KVPool(ours.arch, 8, 16, torch.float32)
    prefill_logits(ours.model, pool3, ids[:69])
    last = decode_logits(ours.model, pool3, int(ids[69]), 69)
    torch.testing.assert_close(last, ref[69], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_tracks_float32(tmp_path, dtype):
    _save_hf_checkpoint(tmp_path)
    ids = torch.randint(0, 300, (40,), generator=torch.Generator().manual_seed(2))
    ref = prefill_logits(load_model(str(tmp_path), "float32").model,
                         KVPool(load_model(str(tmp_path)).arch, 4, 16, torch.float32), ids)
    low = load_model(str(tmp_path), dtype)
    got = prefill_logits(low.model, KVPool(low.arch, 4, 16, low.model.dtype), ids)
    assert got.dtype == torch.float32
    cos = torch.nn.functional.cosine_similarity(got, ref, dim=-1)
    assert cos.min() > 0.99, cos.min()
