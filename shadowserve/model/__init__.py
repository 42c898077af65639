"""Llama-family models: architecture, paged attention, loaders (GGUF, HF dirs, random presets), tokenizers."""
