"""``bench codec --layer-sensitivity`` scores each layer's quantization alone, on a tiny HF model."""

from __future__ import annotations

import pytest
import torch

from shadowserve.bench.suites import codec as bench_codec
from shadowserve.config import CodecConfig

transformers = pytest.importorskip("transformers")


def test_layer_sensitivity_isolates_one_layer():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 128, (1, 96), generator=torch.Generator().manual_seed(1))
    ctx, ev = ids[:, :64], ids[:, 64:]
    kv = bench_codec._prefill(model, ctx)
    ref = bench_codec._score(model, kv, ev)
    targets = ev[0, 1:]

    coarse = bench_codec._layer_sensitivity(model, kv, ev, ref, targets, CodecConfig(quant="uniform", bins=3))
    fine = bench_codec._layer_sensitivity(model, kv, ev, ref, targets, CodecConfig(quant="int8"))
    assert len(coarse) == len(fine) == 3
    # int8 in the probed layer too: every row is the same all-int8 codec, close to exact.
    assert all(abs(r["kl"] - fine[0]["kl"]) < 1e-9 for r in fine)
    assert fine[0]["kl"] < 1e-3
    # 3 levels (-1, 0, 1) in one layer cost far more than int8 there, in every layer.
    assert all(c["kl"] > 10 * f["kl"] for c, f in zip(coarse, fine))
