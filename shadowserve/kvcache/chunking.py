"""Token ids -> fixed-size chunks -> chained chunk keys.

``key_i = blake2b-128(key_{i-1} || token ids of chunk i as little-endian uint32)`` with ``key_{-1}``
a seed derived from the model fingerprint, the KV format id (the codec id without its lossless
stage: ``KVCodec.kv_format_id``) and the request's ``cache_salt`` when it has one. Chaining makes a
key name the whole prefix up to its chunk (the KV of a chunk depends on every earlier token), and the
seed keeps keys of another model, dtype or quantizer from ever matching, while chunks that differ
only in their lossless stage share keys. blake2b rather than a fast non-cryptographic hash because
the store may be shared: nobody should be able to craft a prompt whose key collides with someone
else's prefix. At about 1 KB per chunk the hash costs a microsecond.

A salt (say one per tenant) opens a separate key space: tenants with different salts can neither
reuse nor probe each other's prefixes. No salt leaves the seed exactly as it was before salts
existed, so chunks already stored keep their keys.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

KEY_BYTES = 16
_SEED_DOMAIN = b"shadowserve/chunk-key/v1\x00"


def key_seed(model_fingerprint: str, kv_format_id: str, cache_salt: str | None = None) -> bytes:
    """The chain's starting value for one (model, KV format[, salt]); stable across processes and machines.

    The salt is a third length-prefixed field: no salt, not even an empty one, hashes the same input
    as no salt at all.
    """
    h = hashlib.blake2b(digest_size=KEY_BYTES)
    h.update(_SEED_DOMAIN)
    parts = [model_fingerprint, kv_format_id]
    if cache_salt is not None:
        parts.append(cache_salt)
    for part in parts:
        raw = part.encode("utf-8")
        h.update(len(raw).to_bytes(4, "little"))  # length-prefixed: ("ab", "c") != ("a", "bc")
        h.update(raw)
    return h.digest()


def num_full_chunks(n_tokens: int, chunk_size: int) -> int:
    """How many complete chunks ``n_tokens`` tokens make; the tail is always recomputed."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return max(0, n_tokens) // chunk_size


def chunk_keys(token_ids: Sequence[int], chunk_size: int, seed: bytes) -> list[bytes]:
    """Chained keys of the full chunks of ``token_ids`` (``len // chunk_size`` keys of 16 bytes)."""
    n = num_full_chunks(len(token_ids), chunk_size)
    if n == 0:
        return []
    ids = np.asarray(token_ids[: n * chunk_size], dtype=np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= 2**32):
        raise ValueError("token ids must be in [0, 2**32)")
    raw = ids.astype("<u4").tobytes()
    step = chunk_size * 4
    keys: list[bytes] = []
    prev = seed
    for i in range(n):
        prev = hashlib.blake2b(prev + raw[i * step: (i + 1) * step], digest_size=KEY_BYTES).digest()
        keys.append(prev)
    return keys
