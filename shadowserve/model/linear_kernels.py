"""How the model's weight matmuls run: plain ``F.linear``, or fbgemm's packed fp16 GEMM on CPU.

Why: a CPU decode step is ~85% weight matmuls and streams every weight once per step. fbgemm keeps
each weight packed once in float16 (half the bytes of float32) and multiplies float32 activations
with float32 accumulation: 2-4x faster than MKL's float32 GEMM on our CPU machines at every batch
size, with weights within 2^-11 (relative) of the float32 ones. Activations, norms, attention and
the KV cache stay float32. ``dense`` keeps the exact float32 path (and is the only one on CUDA or
for bfloat16/float16 models, which already stream half-size weights).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from shadowserve.config import LINEAR_KERNELS
from shadowserve.errors import ModelError


class DenseLinear:
    """``y = x @ W.T`` through torch's own GEMM; reads the parameter each call (weights may be reloaded)."""

    kind = "dense"

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class Fp16PackedLinear:
    """The same product with W packed once into fbgemm's float16 panel layout (a snapshot of W)."""

    kind = "fp16"

    def __init__(self, weight: torch.Tensor) -> None:
        self.packed = torch.ops.quantized.linear_prepack_fp16(weight.detach().float().contiguous(), None)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic_fp16(x, self.packed)


@functools.cache
def fp16_packing_available() -> bool:
    """fbgemm's fp16 GEMM exists only in x86 CPU builds with AVX2; probe it once with a tiny product."""
    try:
        w = torch.ones(8, 16)
        out = Fp16PackedLinear(w)(torch.ones(2, 16))
        return bool(torch.allclose(out, torch.full((2, 8), 16.0)))
    except (RuntimeError, NotImplementedError, AttributeError):
        return False


def resolve_linear_kernel(kind: str, dtype: torch.dtype, device: torch.device | str) -> str:
    """``auto`` picks ``fp16`` for float32 models on a CPU that has it, else ``dense``."""
    if kind not in LINEAR_KERNELS:
        raise ModelError(f"unknown linear kernel {kind!r}: choose one of {', '.join(LINEAR_KERNELS)}")
    on_cpu = torch.device(device).type == "cpu"
    if kind == "auto":
        return "fp16" if on_cpu and dtype == torch.float32 and fp16_packing_available() else "dense"
    if kind == "fp16":
        if not on_cpu or dtype != torch.float32:
            raise ModelError("linear kernel 'fp16' needs a float32 model on the CPU (use dense)")
        if not fp16_packing_available():
            raise ModelError("linear kernel 'fp16' needs torch's fbgemm (x86 with AVX2); use dense")
    return kind


def make_linear(weight: torch.Tensor, kind: str) -> DenseLinear | Fp16PackedLinear:
    return Fp16PackedLinear(weight) if kind == "fp16" else DenseLinear(weight)
