"""KV-cache chunks: chained chunk keys, the quantize + lossless codec, and the checked container.

Names are loaded on first use so that importing a submodule (e.g. ``kvcache.lossless`` for config
validation) does not pull in torch.
"""

from importlib import import_module

_EXPORTS = {
    "chunk_keys": "chunking",
    "key_seed": "chunking",
    "num_full_chunks": "chunking",
    "KVCodec": "codec",
    "codec_id_of": "codec",
    "kv_format_id_of": "codec",
    "ChunkHeader": "format",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f"shadowserve.kvcache.{_EXPORTS[name]}"), name)
    raise AttributeError(name)
