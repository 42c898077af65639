"""Small synthetic KV chunks: Gaussian values with a few large key channels, like real models."""

from __future__ import annotations

import pytest
import torch

SHAPE = (4, 2, 32, 2, 16)  # layers, K/V, tokens, kv_heads, head_dim
FINGERPRINT = "test-model:sha256=0123abcd:float16"


def make_kv(shape=SHAPE, dtype=torch.float32, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    kv = torch.randn(shape, generator=g)
    kv[:, 0, :, :, 3] *= 20.0  # an outlier key channel
    kv[:, :, 0] *= 5.0  # an "attention sink" first token
    return kv.to(dtype)


@pytest.fixture
def kv() -> torch.Tensor:
    return make_kv()
