import subprocess
import sys

import pytest

from shadowserve.kvcache.chunking import chunk_keys, key_seed, num_full_chunks

TOKENS = list(range(1000, 1000 + 1030))


def test_only_full_chunks_are_keyed():
    seed = key_seed("m", "c")
    assert len(chunk_keys(TOKENS, 256, seed)) == 4 == num_full_chunks(len(TOKENS), 256)
    assert chunk_keys(TOKENS[:255], 256, seed) == []
    assert num_full_chunks(0, 16) == 0
    with pytest.raises(ValueError):
        num_full_chunks(10, 0)


def test_keys_are_chained():
    seed = key_seed("m", "c")
    base = chunk_keys(TOKENS, 256, seed)
    changed = list(TOKENS)
    changed[5] += 1  # inside chunk 0
    other = chunk_keys(changed, 256, seed)
    assert all(a != b for a, b in zip(base, other))
    changed = list(TOKENS)
    changed[600] += 1  # inside chunk 2: chunks 0 and 1 keep their keys
    other = chunk_keys(changed, 256, seed)
    assert other[:2] == base[:2] and all(a != b for a, b in zip(base[2:], other[2:]))
    # A prefix has the same keys as the longer sequence's first chunks.
    assert chunk_keys(TOKENS[:512], 256, seed) == base[:2]


def test_keys_differ_across_models_and_codecs():
    a = chunk_keys(TOKENS, 256, key_seed("model-a", "codec-1"))
    b = chunk_keys(TOKENS, 256, key_seed("model-b", "codec-1"))
    c = chunk_keys(TOKENS, 256, key_seed("model-a", "codec-2"))
    assert not set(a) & set(b) and not set(a) & set(c) and not set(b) & set(c)
    # Length-prefixed fields: moving a character between them changes the seed.
    assert key_seed("ab", "c") != key_seed("a", "bc")


def test_keys_are_stable_across_processes():
    code = (
        "from shadowserve.kvcache.chunking import chunk_keys, key_seed;"
        "print(','.join(k.hex() for k in chunk_keys(list(range(1000, 2030)), 256, key_seed('m', 'c'))))"
    )
    # A different hash seed in the child proves Python's hash() is not involved.
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "12345", **{k: v for k, v in __import__("os").environ.items()
                                                              if k != "PYTHONHASHSEED"}})
    here = [k.hex() for k in chunk_keys(TOKENS, 256, key_seed("m", "c"))]
    assert out.stdout.strip().split(",") == here
    # Pinned value: a change to the key scheme must be deliberate (it orphans every stored chunk).
    assert here[0] == "0227099c43dde59af3daf1ecfaa09ad7"


def test_token_id_range_is_checked():
    with pytest.raises(ValueError):
        chunk_keys([-1] * 16, 16, b"s")
    with pytest.raises(ValueError):
        chunk_keys([2**32] * 16, 16, b"s")


def test_accepts_tuples_and_arrays():
    import numpy as np

    seed = key_seed("m", "c")
    assert chunk_keys(tuple(TOKENS), 256, seed) == chunk_keys(np.array(TOKENS), 256, seed) == chunk_keys(TOKENS, 256, seed)


def test_cache_salt_opens_its_own_key_space():
    plain = key_seed("m", "c")
    # No salt is the seed as it was before salts existed: every chunk already stored keeps its key.
    assert key_seed("m", "c", None) == plain
    assert plain.hex() == "dab665046723c84b9440d2bd76d2155a"
    salted = {s: chunk_keys(TOKENS, 256, key_seed("m", "c", s)) for s in ("tenant-a", "tenant-b", "")}
    base = set(chunk_keys(TOKENS, 256, plain))
    for s, keys in salted.items():
        assert len(keys) == 4 and not set(keys) & base, s
    assert not set(salted["tenant-a"]) & set(salted["tenant-b"])
    assert chunk_keys(TOKENS, 256, key_seed("m", "c", "tenant-a")) == salted["tenant-a"]  # same salt: same keys
    # The salt is its own length-prefixed field: it cannot be slid into the codec id or out of it.
    assert key_seed("m", "cx", None) != key_seed("m", "c", "x")
