"""The key function the builder hands every manager: salts separate tenants, no salt changes nothing."""

from __future__ import annotations

from shadowserve.config import CodecConfig
from shadowserve.controlplane.builder import chunk_key_fn
from shadowserve.kvcache.chunking import chunk_keys, key_seed
from shadowserve.kvcache.codec import kv_format_id_of

CODEC = CodecConfig(quant="none", lossless="zstd")
IDS = list(range(3, 3 + 100))


def test_unsalted_keys_are_the_keys_stored_before_salts():
    keys = chunk_key_fn("fp", CODEC, 32)
    assert keys(IDS) == keys(IDS, None) == chunk_keys(IDS, 32, key_seed("fp", kv_format_id_of(CODEC)))
    # Pinned (computed before salts existed): a change here orphans every chunk already in a store.
    assert keys(IDS)[0].hex() == "fdacd3e632601aca78a93f608f7fa1d0"


def test_salted_keys_differ_per_salt_and_repeat_per_salt():
    keys = chunk_key_fn("fp", CODEC, 32)
    a, b, plain = keys(IDS, "alice"), keys(IDS, "bob"), keys(IDS)
    assert len(a) == len(b) == len(plain) == 3
    assert not set(a) & set(b) and not set(a) & set(plain) and not set(b) & set(plain)
    assert keys(IDS, "alice") == a
    assert keys(IDS[:64], "alice") == a[:2]  # still chained: a salted prefix keeps its keys
