"""KV-cache chunks: chained chunk keys, the quantize + lossless codec, and the checked container."""

from shadowserve.kvcache.chunking import chunk_keys, key_seed, num_full_chunks
from shadowserve.kvcache.codec import KVCodec, codec_id_of
from shadowserve.kvcache.format import ChunkHeader

__all__ = ["ChunkHeader", "KVCodec", "chunk_keys", "codec_id_of", "key_seed", "num_full_chunks"]
