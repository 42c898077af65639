"""Turn a model name or path into a ready model, tokenizer and fingerprint.

Sources: the registry's names (real SmolLM2 GGUF, random presets), a GGUF file, or an HF model
directory (config.json + *.safetensors + tokenizer.json). The fingerprint names the exact weights,
architecture and dtype, so KV computed by one model can never be mistaken for another's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import xxhash
from safetensors.torch import load_file
from tqdm import tqdm

from shadowserve.errors import ModelError
from shadowserve.model.arch import ModelArch
from shadowserve.model.llama import LlamaForCausalLM
from shadowserve.model.registry import MODELS
from shadowserve.model.tokenizer import (
    Tokenizer,
    byte_tokenizer,
    tokenizer_from_gguf_fields,
    tokenizer_from_hf_dir,
)
from shadowserve.model.weights_download import smollm2_gguf_path

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    name: str
    model: LlamaForCausalLM
    tokenizer: Tokenizer
    arch: ModelArch
    weights_fingerprint: str  # hex digest over architecture, weights and dtype

    @property
    def fingerprint(self) -> str:
        """Names the KV this model computes: the weights, plus the matmul kernel when it is not exact.

        KV from fbgemm's fp16 kernel differs from dense float32 KV in the last bits, so the two never
        share store entries (a lossless fetch must reproduce recompute token for token).
        """
        kernel = self.model.linear_kernel
        return self.weights_fingerprint if kernel == "dense" else f"{self.weights_fingerprint}:{kernel}"

    @property
    def max_model_len(self) -> int:
        return self.arch.max_position_embeddings


def torch_dtype(name: str) -> torch.dtype:
    try:
        return TORCH_DTYPES[name]
    except KeyError:
        raise ModelError(f"unknown dtype {name!r}: choose one of {', '.join(TORCH_DTYPES)}") from None


def load_model(name_or_path: str, dtype: str = "float32", device: str = "cpu", progress: bool = True) -> LoadedModel:
    """Load a registry name, a ``.gguf`` file or an HF model directory."""
    tdtype = torch_dtype(dtype)
    spec = MODELS.get(name_or_path)
    if spec is not None and spec.source == "random":
        return _load_random(spec.name, spec.arch, spec.seed, tdtype, dtype, device)
    if spec is not None and spec.source == "smollm2-gguf":
        return _load_gguf(smollm2_gguf_path(progress=progress), spec.name, tdtype, dtype, device, progress)
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return _load_hf_dir(path, tdtype, dtype, device)
    if path.suffix == ".gguf" or path.is_file():
        if not path.exists():
            raise ModelError(f"GGUF file {path} does not exist")
        return _load_gguf(path, path.name, tdtype, dtype, device, progress)
    known = ", ".join(MODELS)
    raise ModelError(f"unknown model {name_or_path!r}: use one of {known}, a .gguf file or an HF model directory")


def _fingerprint(arch: ModelArch, dtype: str, weights_digest: str) -> str:
    h = xxhash.xxh3_128()
    h.update(arch.to_json().encode())
    h.update(dtype.encode())
    h.update(weights_digest.encode())
    return h.hexdigest()


def _file_digest(paths: list[Path]) -> str:
    h = xxhash.xxh3_128()
    for p in paths:
        with open(p, "rb") as f:
            while block := f.read(1 << 24):
                h.update(block)
    return h.hexdigest()


def _load_random(name: str, arch: ModelArch, seed: int, tdtype: torch.dtype, dtype: str, device: str) -> LoadedModel:
    model = LlamaForCausalLM(arch, tdtype, device)
    model.init_random(seed)
    # GPU draws differ from CPU ones (llama.init_random): their KV must never be mixed in a store.
    origin = f"random:{name}:{seed}" + (":cuda" if model.device.type == "cuda" else "")
    return LoadedModel(name, model, byte_tokenizer(), arch, _fingerprint(arch, dtype, origin))


# ---- GGUF ---------------------------------------------------------------------------------------

_GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def _unpermute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo the q/k row permutation llama.cpp's converter applies (interleaved -> rotate-half RoPE)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_gguf(path: Path):
    """Open a GGUF file, turning the reader's low-level failures into a clear ModelError."""
    from gguf import GGUFReader

    try:
        return GGUFReader(str(path))
    except FileNotFoundError:
        raise ModelError(f"GGUF file {path} does not exist") from None
    except Exception as exc:  # the reader raises ValueError/struct errors/IndexError on bad files
        raise ModelError(f"{path} is not a readable GGUF file ({type(exc).__name__}: {exc})") from None


def _gguf_fields(reader) -> dict:
    out = {}
    for key, field in reader.fields.items():
        try:
            out[key] = field.contents()
        except Exception:  # a field type we do not need; skip rather than fail the whole load
            continue
    return out


def _load_gguf(path: Path, name: str, tdtype: torch.dtype, dtype: str, device: str, progress: bool) -> LoadedModel:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    reader = read_gguf(path)
    fields = _gguf_fields(reader)
    family = fields.get("general.architecture")
    if family not in ("llama", "mistral"):
        raise ModelError(f"{path.name}: GGUF architecture {family!r} is not a Llama-family model")
    try:
        names = {t.name for t in reader.tensors}
        arch = ModelArch(
            vocab_size=int(fields.get(f"{family}.vocab_size") or len(fields["tokenizer.ggml.tokens"])),
            hidden_size=int(fields[f"{family}.embedding_length"]),
            intermediate_size=int(fields[f"{family}.feed_forward_length"]),
            num_hidden_layers=int(fields[f"{family}.block_count"]),
            num_attention_heads=int(fields[f"{family}.attention.head_count"]),
            num_key_value_heads=int(fields.get(f"{family}.attention.head_count_kv")
                                    or fields[f"{family}.attention.head_count"]),
            head_dim=int(fields.get(f"{family}.attention.key_length") or 0),
            rope_theta=float(fields.get(f"{family}.rope.freq_base", 10000.0)),
            rms_norm_eps=float(fields.get(f"{family}.attention.layer_norm_rms_epsilon", 1e-5)),
            tie_word_embeddings="output.weight" not in names,
            max_position_embeddings=int(fields.get(f"{family}.context_length", 2048)),
            bos_token_id=fields.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=(int(fields.get("tokenizer.ggml.eos_token_id", 2)),),
        )
    except KeyError as exc:
        raise ModelError(f"{path.name}: GGUF metadata is missing {exc.args[0]!r}") from None
    tokenizer = tokenizer_from_gguf_fields(fields)
    arch = ModelArch(**{**arch.__dict__, "eos_token_ids": tokenizer.eos_token_ids})

    weights: dict[str, torch.Tensor] = {}
    tensors = reader.tensors
    if progress:
        tensors = tqdm(tensors, desc=f"loading {name}", unit="tensor", leave=False)
    for t in tensors:
        try:
            if t.tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
                arr = np.asarray(t.data, dtype=np.float32)
            else:
                arr = dequantize(t.data, t.tensor_type)
            arr = arr.reshape(tuple(int(d) for d in reversed(t.shape)))
        except Exception as exc:
            raise ModelError(f"{path.name}: cannot decode tensor {t.name} ({type(exc).__name__}: {exc})") from None
        hf_name = _gguf_to_hf_name(t.name)
        if hf_name is None:
            continue
        if hf_name.endswith("q_proj.weight"):
            arr = _unpermute_rope(arr, arch.num_attention_heads)
        elif hf_name.endswith("k_proj.weight"):
            arr = _unpermute_rope(arr, arch.num_key_value_heads)
        weights[hf_name] = torch.from_numpy(np.array(arr, dtype=np.float32))  # own, writable copy
    model = LlamaForCausalLM(arch, tdtype, device)
    model.load_hf_weights(weights)
    return LoadedModel(name, model, tokenizer, arch, _fingerprint(arch, dtype, _file_digest([path])))


def _gguf_to_hf_name(name: str) -> str | None:
    if name == "token_embd.weight":
        return "model.embed_tokens.weight"
    if name == "output_norm.weight":
        return "model.norm.weight"
    if name == "output.weight":
        return "lm_head.weight"
    if name.startswith("blk."):
        _, idx, part, kind = name.split(".", 3)
        if part in _GGUF_LAYER_NAMES:
            return f"model.layers.{idx}.{_GGUF_LAYER_NAMES[part]}.{kind}"
    return None  # e.g. rope_freqs: we derive RoPE from the metadata


# ---- HF directory -------------------------------------------------------------------------------


def _load_hf_dir(path: Path, tdtype: torch.dtype, dtype: str, device: str) -> LoadedModel:
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise ModelError(f"{path} is not an HF model directory: no config.json")
    try:
        cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as exc:
        raise ModelError(f"{cfg_file} is not valid JSON: {exc}") from None
    arch = ModelArch.from_hf_config(cfg)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelError(f"{path} has no *.safetensors weights")
    weights: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            weights.update(load_file(str(f)))
        except Exception as exc:  # safetensors raises SafetensorError / OSError on damaged files
            raise ModelError(f"cannot read weights {f.name}: {exc}") from None
    tokenizer = tokenizer_from_hf_dir(path, arch.eos_token_ids, arch.bos_token_id)
    model = LlamaForCausalLM(arch, tdtype, device)
    model.load_hf_weights(weights)
    return LoadedModel(path.name, model, tokenizer, arch, _fingerprint(arch, dtype, _file_digest(files)))
