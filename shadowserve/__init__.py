"""ShadowServe: LLM serving with distributed prefix caching and an isolated KV data plane."""

from shadowserve.errors import (
    ChunkFormatError,
    ConfigError,
    FetchError,
    ModelError,
    ShadowServeError,
    StoreError,
)

__version__ = "0.1.0"

__all__ = [
    "LLM",
    "SamplingParams",
    "ShadowServeError",
    "ConfigError",
    "ModelError",
    "ChunkFormatError",
    "StoreError",
    "FetchError",
]


def __getattr__(name: str):
    # Lazy so that `import shadowserve` (and the CLI) stays fast and torch-free until needed.
    if name == "LLM":
        from shadowserve.llm import LLM

        return LLM
    if name == "SamplingParams":
        from shadowserve.engine.request import SamplingParams

        return SamplingParams
    raise AttributeError(name)
