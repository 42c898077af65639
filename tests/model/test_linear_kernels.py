"""The packed fp16 weight kernel against the dense float32 path and HF transformers."""

from __future__ import annotations

import pytest
import torch

from shadowserve.config import EngineConfig
from shadowserve.engine.kv_pool import KVPool
from shadowserve.errors import ConfigError, ModelError
from shadowserve.model.linear_kernels import fp16_packing_available, resolve_linear_kernel
from shadowserve.model.loader import load_model
from tests.model.helpers import decode_logits, prefill_logits
from tests.model.test_llama_vs_transformers import _save_hf_checkpoint

needs_fbgemm = pytest.mark.skipif(not fp16_packing_available(), reason="torch has no fbgemm fp16 GEMM here")


@needs_fbgemm
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_fp16_kernel_tracks_transformers(tmp_path, tied):
    hf = _save_hf_checkpoint(tmp_path, tie_word_embeddings=tied)
    ours = load_model(str(tmp_path), "float32")
    ids = torch.randint(0, 300, (70,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = hf(ids[None]).logits[0]
    dense = prefill_logits(ours.model, KVPool(ours.arch, 8, 16, torch.float32), ids)
    ours.model.use_linear_kernel("fp16")
    assert ours.model.linear_kernel == "fp16" and ours.model.head.kind == "fp16"
    pool = KVPool(ours.arch, 8, 16, torch.float32)
    packed = prefill_logits(ours.model, pool, ids[:69])
    last = decode_logits(ours.model, pool, int(ids[69]), 69)
    # Weights rounded to fp16 (2^-11 relative): close to float32, but not the same bits.
    assert not torch.equal(packed, dense[:69])
    torch.testing.assert_close(packed, ref[:69], atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(last, ref[69], atol=2e-3, rtol=2e-3)
    assert (packed.argmax(-1) == ref[:69].argmax(-1)).all()


@needs_fbgemm
def test_packed_weights_follow_a_reload(tmp_path):
    """Packing snapshots the weights, so loading new ones must re-pack (or the old model runs)."""
    _save_hf_checkpoint(tmp_path)
    model = load_model(str(tmp_path), "float32").model
    model.use_linear_kernel("fp16")
    ids = torch.arange(20)
    before = prefill_logits(model, KVPool(model.arch, 4, 16, torch.float32), ids)
    model.init_random(seed=7)
    after = prefill_logits(model, KVPool(model.arch, 4, 16, torch.float32), ids)
    model.use_linear_kernel("dense")
    dense_after = prefill_logits(model, KVPool(model.arch, 4, 16, torch.float32), ids)
    assert not torch.allclose(before, after, atol=1e-2)
    torch.testing.assert_close(after, dense_after, atol=2e-3, rtol=2e-3)


@needs_fbgemm
def test_kernel_is_part_of_the_kv_fingerprint():
    loaded = load_model("tiny-random")
    loaded.model.use_linear_kernel("dense")
    dense = loaded.fingerprint
    loaded.model.use_linear_kernel("auto")
    assert loaded.model.linear_kernel == "fp16"
    assert loaded.fingerprint == f"{dense}:fp16"


def test_kernel_choice_errors():
    with pytest.raises(ConfigError, match="unknown linear_kernel"):
        EngineConfig(linear_kernel="int3")
    with pytest.raises(ModelError, match="unknown linear kernel"):
        resolve_linear_kernel("int3", torch.float32, "cpu")
    with pytest.raises(ModelError, match="float32 model on the CPU"):
        resolve_linear_kernel("fp16", torch.bfloat16, "cpu")
    assert resolve_linear_kernel("auto", torch.bfloat16, "cpu") == "dense"
    assert resolve_linear_kernel("dense", torch.float32, "cpu") == "dense"
