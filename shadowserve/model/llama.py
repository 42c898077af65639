"""A Llama-family decoder (RMSNorm, RoPE, grouped-query attention, SwiGLU) over the paged KV pool.

Weights use HF ``LlamaForCausalLM`` names on load; q/k/v and gate/up are fused into single matmuls
because on a CPU each extra small matmul costs as much in overhead as in arithmetic.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from shadowserve.errors import ModelError
from shadowserve.model.arch import ModelArch
from shadowserve.model.attention import AttentionMetadata, paged_attention
from shadowserve.model.linear_kernels import make_linear, resolve_linear_kernel


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in float32 and cast back, as the reference implementation does."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rope_inv_freq(arch: ModelArch) -> torch.Tensor:
    """Inverse frequencies for RoPE, applying the config's rope_scaling (linear or llama3)."""
    dim = arch.head_dim
    inv_freq = 1.0 / (arch.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = arch.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        pass
    elif kind == "linear":
        inv_freq = inv_freq / float(scaling["factor"])
    elif kind == "llama3":
        factor = float(scaling["factor"])
        low = float(scaling.get("low_freq_factor", 1.0))
        high = float(scaling.get("high_freq_factor", 4.0))
        old_ctx = float(scaling.get("original_max_position_embeddings", 8192))
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_ctx / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
        mid = (wavelen <= old_ctx / low) & (wavelen >= old_ctx / high)
        inv_freq = torch.where(mid, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)
    else:
        raise ModelError(f"unsupported rope_scaling type {kind!r}")
    return inv_freq.float()


class DecoderLayer(nn.Module):
    def __init__(self, arch: ModelArch, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        h, hd = arch.hidden_size, arch.head_dim
        self.n_heads, self.n_kv = arch.num_attention_heads, arch.num_key_value_heads
        self.head_dim, self.eps = hd, arch.rms_norm_eps
        self.q_size, self.kv_size = self.n_heads * hd, self.n_kv * hd
        self.inter = arch.intermediate_size

        def p(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)

        self.input_norm = p(h)
        self.qkv_proj = p(self.q_size + 2 * self.kv_size, h)
        self.o_proj = p(h, self.q_size)
        self.post_attn_norm = p(h)
        self.gate_up_proj = p(2 * arch.intermediate_size, h)
        self.down_proj = p(h, arch.intermediate_size)
        self.use_linear_kernel("dense")

    def use_linear_kernel(self, kind: str) -> None:
        """(Re)build the four weight matmuls with the given kernel from the current weights."""
        self.qkv = make_linear(self.qkv_proj, kind)
        self.o = make_linear(self.o_proj, kind)
        self.gate_up = make_linear(self.gate_up_proj, kind)
        self.down = make_linear(self.down_proj, kind)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_layer: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        n = x.shape[0]
        qkv = self.qkv(rms_norm(x, self.input_norm, self.eps))
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = apply_rope(q.view(n, self.n_heads, self.head_dim), cos, sin)
        k = apply_rope(k.view(n, self.n_kv, self.head_dim), cos, sin)
        v = v.reshape(n, self.n_kv, self.head_dim)
        attn = torch.empty_like(q)
        paged_attention(q, k, v, kv_layer, meta, attn)
        x = x + self.o(attn.view(n, self.q_size))
        gate, up = self.gate_up(rms_norm(x, self.post_attn_norm, self.eps)).split(self.inter, dim=-1)
        return x + self.down(F.silu(gate) * up)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE (the HF layout); x: [N, heads, head_dim], cos/sin: [N, 1, head_dim]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class LlamaForCausalLM(nn.Module):
    """The decoder stack plus embedding and LM head, run over a paged KV pool."""

    def __init__(self, arch: ModelArch, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        super().__init__()
        device = torch.device(device)
        self.arch, self.dtype, self.device = arch, dtype, device
        self.embed_tokens = nn.Parameter(
            torch.empty(arch.vocab_size, arch.hidden_size, dtype=dtype, device=device), requires_grad=False
        )
        self.layers = nn.ModuleList(DecoderLayer(arch, dtype, device) for _ in range(arch.num_hidden_layers))
        self.norm = nn.Parameter(torch.empty(arch.hidden_size, dtype=dtype, device=device), requires_grad=False)
        self.lm_head = (
            self.embed_tokens
            if arch.tie_word_embeddings
            else nn.Parameter(torch.empty(arch.vocab_size, arch.hidden_size, dtype=dtype, device=device),
                              requires_grad=False)
        )
        inv_freq = rope_inv_freq(arch).to(device)
        pos = torch.arange(arch.max_position_embeddings, dtype=torch.float32, device=device)
        freqs = torch.outer(pos, inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("rope_cos", emb.cos().to(dtype), persistent=False)
        self.register_buffer("rope_sin", emb.sin().to(dtype), persistent=False)
        self.linear_kernel = "dense"
        self.head = make_linear(self.lm_head, "dense")

    def use_linear_kernel(self, kind: str) -> None:
        """Run every weight matmul (LM head included) with ``kind`` (see model/linear_kernels.py).

        The dense parameters stay: embedding lookups read them, and another engine sharing this
        model may switch back. Asking for the kernel already in use costs nothing (packing
        SmolLM2 takes ~0.8 s; benchmarks build an engine per mode on one shared model).
        """
        kind = resolve_linear_kernel(kind, self.dtype, self.device)
        if kind != self.linear_kernel:
            self.linear_kernel = kind
            self._build_linears()

    def _build_linears(self) -> None:
        """(Re)build every weight matmul from the current weights: packed kernels are snapshots."""
        for layer in self.layers:
            layer.use_linear_kernel(self.linear_kernel)
        self.head = make_linear(self.lm_head, self.linear_kernel)

    @torch.inference_mode()
    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, kv_tensor: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """Run the stack on a flat batch of N new tokens; returns final hidden states [N, hidden]."""
        x = F.embedding(input_ids, self.embed_tokens)
        cos = self.rope_cos[positions].unsqueeze(1)
        sin = self.rope_sin[positions].unsqueeze(1)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, kv_tensor[i], meta)
        return rms_norm(x, self.norm, self.arch.rms_norm_eps)

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 logits for the given rows of final hidden states."""
        return self.head(hidden).float()

    # ---- weights -------------------------------------------------------------------------------

    def load_hf_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Load a state dict with HF LlamaForCausalLM names, fusing q/k/v and gate/up."""
        weights = {k.removeprefix("model."): v for k, v in weights.items()}

        def take(name: str) -> torch.Tensor:
            try:
                return weights.pop(name)
            except KeyError:
                raise ModelError(f"weights are missing tensor {name!r}") from None

        def put(param: torch.Tensor, value: torch.Tensor, name: str) -> None:
            if tuple(param.shape) != tuple(value.shape):
                raise ModelError(f"tensor {name} has shape {tuple(value.shape)}, expected {tuple(param.shape)}")
            param.data.copy_(value.to(param.dtype))

        put(self.embed_tokens, take("embed_tokens.weight"), "embed_tokens.weight")
        put(self.norm, take("norm.weight"), "norm.weight")
        if not self.arch.tie_word_embeddings:
            head = weights.pop("lm_head.weight", None)
            if head is None:
                raise ModelError("weights have no lm_head.weight and the config does not tie embeddings")
            put(self.lm_head, head, "lm_head.weight")
        else:
            weights.pop("lm_head.weight", None)
        for i, layer in enumerate(self.layers):
            pre = f"layers.{i}."
            put(layer.input_norm, take(pre + "input_layernorm.weight"), pre + "input_layernorm.weight")
            put(layer.post_attn_norm, take(pre + "post_attention_layernorm.weight"), pre + "post_attention_layernorm")
            qkv = torch.cat([take(pre + f"self_attn.{n}_proj.weight") for n in "qkv"], dim=0)
            put(layer.qkv_proj, qkv, pre + "self_attn.qkv")
            put(layer.o_proj, take(pre + "self_attn.o_proj.weight"), pre + "self_attn.o_proj.weight")
            gate_up = torch.cat([take(pre + "mlp.gate_proj.weight"), take(pre + "mlp.up_proj.weight")], dim=0)
            put(layer.gate_up_proj, gate_up, pre + "mlp.gate_up")
            put(layer.down_proj, take(pre + "mlp.down_proj.weight"), pre + "mlp.down_proj.weight")
        leftovers = [k for k in weights if "rotary_emb" not in k]
        if leftovers:
            raise ModelError(f"unexpected tensors in weights: {', '.join(sorted(leftovers)[:5])}")
        self._build_linears()

    def init_random(self, seed: int) -> None:
        """Deterministic random weights (std 0.02, unit norms): same seed, same model, any process.

        On a GPU they are drawn on the device (seconds for 8B shapes instead of minutes), so a GPU
        model is reproducible across GPU processes but differs from the CPU one of the same seed.
        """
        on_gpu = self.device.type == "cuda"
        gen = torch.Generator(device=self.device if on_gpu else "cpu").manual_seed(seed)
        for name, param in self.named_parameters():
            if name.endswith("norm"):
                param.data.fill_(1.0)
            elif on_gpu:
                param.data.normal_(0.0, 0.02, generator=gen)
            else:
                # Generate on CPU in float32 so every device and dtype sees the same values.
                rows = param.shape[0]
                step = max(1, (1 << 24) // max(1, param[0].numel()))
                for r in range(0, rows, step):
                    chunk = torch.randn(param[r : r + step].shape, generator=gen) * 0.02
                    param.data[r : r + step].copy_(chunk)
        self._build_linears()
