"""The shape of a Llama-family decoder: everything the model code and the KV pool need to know."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from shadowserve.errors import ModelError


@dataclass(frozen=True)
class ModelArch:
    """Architecture hyper-parameters, named as in HF ``LlamaConfig``."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int = 0  # 0: hidden_size // num_attention_heads
    rope_theta: float = 10000.0
    rope_scaling: dict | None = field(default=None, hash=False, compare=False)
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 2048
    bos_token_id: int | None = 1
    eos_token_ids: tuple[int, ...] = (2,)

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ModelError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "head_dim"):
            if getattr(self, name) <= 0:
                raise ModelError(f"model config: {name} must be > 0")

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of fp16 KV one token occupies across all layers (K and V)."""
        return 2 * 2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_hf_config(cls, cfg: dict) -> ModelArch:
        """Build from a HF ``config.json`` dict of a Llama/Mistral-style model."""
        arch = cfg.get("model_type", "llama")
        if arch not in ("llama", "mistral", "qwen2") and "LlamaForCausalLM" not in cfg.get("architectures", []):
            raise ModelError(f"unsupported model_type {arch!r}: ShadowServe runs Llama-family decoders")
        if cfg.get("attention_bias") or arch == "qwen2":
            raise ModelError("attention biases are not supported yet")
        # transformers >= 5 writes RoPE settings as one "rope_parameters" dict; older files use
        # "rope_theta" plus an optional "rope_scaling" dict.
        rope = dict(cfg.get("rope_parameters") or {})
        theta = float(rope.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
        scaling = rope if rope.get("rope_type", rope.get("type", "default")) != "default" else cfg.get("rope_scaling")
        eos = cfg.get("eos_token_id", 2)
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        try:
            return cls(
                vocab_size=cfg["vocab_size"],
                hidden_size=cfg["hidden_size"],
                intermediate_size=cfg["intermediate_size"],
                num_hidden_layers=cfg["num_hidden_layers"],
                num_attention_heads=cfg["num_attention_heads"],
                num_key_value_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
                head_dim=cfg.get("head_dim") or 0,
                rope_theta=theta,
                rope_scaling=scaling or None,
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
                bos_token_id=cfg.get("bos_token_id"),
                eos_token_ids=eos_ids,
            )
        except KeyError as exc:
            raise ModelError(f"config.json is missing {exc.args[0]!r}") from exc
