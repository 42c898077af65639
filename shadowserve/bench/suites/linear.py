"""``shadowserve bench linear``: one decode step's weight matmuls, per kernel, at several batch sizes.

Times SmolLM2-135M's 121 matmul shapes per step (30 layers x qkv/o/gate-up/down, plus the LM head)
on random weights, for the kernels the engine has (dense float32, fbgemm fp16) and the alternatives
measured against them: torch's int4 kernel with float32 or bfloat16 activations (exact for Q4_1
weights) and int8 dynamic quantization. It shows where ``linear_kernel="auto"`` comes from.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import torch

# (in, out, times per step) for SmolLM2-135M: fused qkv, o, fused gate/up, down; the LM head once.
SMOLLM2_SHAPES = [(576, 960, 30), (576, 576, 30), (576, 3072, 30), (1536, 576, 30), (576, 49152, 1)]
KERNELS = ("dense", "fp16", "int4-f32act", "int4-bf16act", "int8-dynamic")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-sizes", default="1,8,32", help="rows per matmul (decode batch or prefill tokens)")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--kernels", default=",".join(KERNELS), help=f"comma-separated: {', '.join(KERNELS)}")
    p.add_argument("--repeats", type=int, default=10, help="timed calls per shape (after 2 warm-up calls)")


def _kernel(name: str, w, x):
    """A zero-argument callable computing x @ w.T with kernel ``name`` (weights prepared up front)."""
    if name == "dense":
        return lambda: torch.nn.functional.linear(x, w)
    if name == "fp16":
        packed = torch.ops.quantized.linear_prepack_fp16(w, None)
        return lambda: torch.ops.quantized.linear_dynamic_fp16(x, packed)
    if name.startswith("int4"):
        group = 32
        q = torch.randint(0, 16, w.shape, dtype=torch.int32)
        wq = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        sz = torch.randn(w.shape[1] // group, w.shape[0], 2)
        if name == "int4-bf16act":
            sz, xa = sz.bfloat16(), x.bfloat16()
            return lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(xa, wq, group, sz)
        return lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, wq, group, sz)
    if name == "int8-dynamic":
        scale = w.abs().amax(1) / 127
        wq = torch.clamp((w / scale[:, None]).round(), -127, 127).to(torch.int8)
        packed = torch.ops.quantized.linear_prepack(
            torch.quantize_per_channel(wq.float() * scale[:, None], scale, torch.zeros_like(scale, dtype=torch.long),
                                       0, torch.qint8), None)
        return lambda: torch.ops.quantized.linear_dynamic(x, packed, False)
    raise ValueError(f"unknown kernel {name!r}: choose from {', '.join(KERNELS)}")


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    kernels = [k for k in args.kernels.split(",") if k]
    batches = [int(b) for b in args.batch_sizes.split(",") if b]
    gen = torch.Generator().manual_seed(0)
    rows = []
    print(f"{'rows':>6} " + " ".join(f"{k + ' ms':>15}" for k in kernels) + "   (one step's 121 matmuls)")
    for m in batches:
        row = {"rows": m}
        for name in kernels:
            total = 0.0
            for k_in, n_out, times in SMOLLM2_SHAPES:
                w = torch.randn(n_out, k_in, generator=gen) * 0.02
                x = torch.randn(m, k_in, generator=gen)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # torch's quantized-tensor deprecation notices
                    fn = _kernel(name, w, x)
                for _ in range(2):
                    fn()
                t = time.perf_counter()
                for _ in range(args.repeats):
                    fn()
                total += (time.perf_counter() - t) / args.repeats * times
            row[name] = total * 1e3
        rows.append(row)
        print(f"{m:>6} " + " ".join(f"{row[k]:15.1f}" for k in kernels), flush=True)
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump({"threads": args.threads, "cpu": torch.backends.cpu.get_cpu_capability(), "rows": rows}, f,
                      indent=2)
    return 0
