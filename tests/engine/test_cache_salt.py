"""``cache_salt`` end to end through ``LLM``: a salt is a private prefix cache, locally and in the store.

Lossless codec and greedy decoding, so every request must answer the same tokens whichever cache
served (or did not serve) its prefix; only where the prefix came from may differ.
"""

from __future__ import annotations

import pytest

from shadowserve.engine.request import MAX_CACHE_SALT_CHARS, SamplingParams
from shadowserve.errors import ConfigError
from shadowserve.llm import LLM
from shadowserve.store import open_store

PROMPT = list(range(3, 3 + 150))  # four 32-token chunks, nine 16-token blocks, and a tail


def params(salt: str | None) -> SamplingParams:
    return SamplingParams(max_tokens=4, ignore_eos=True, cache_salt=salt)


@pytest.mark.parametrize("bad", ["", "x" * (MAX_CACHE_SALT_CHARS + 1), 7, b"bytes"])
def test_bad_salts_are_refused(bad):
    with pytest.raises(ConfigError, match="cache_salt must be a non-empty string"):
        SamplingParams(cache_salt=bad)


def test_longest_salt_is_accepted():
    assert SamplingParams(cache_salt="x" * MAX_CACHE_SALT_CHARS).cache_salt == "x" * MAX_CACHE_SALT_CHARS


def test_local_prefix_cache_is_shared_only_within_a_salt(tiny):
    with LLM("tiny-random", progress=False) as llm:
        def run(salt):
            return llm.generate([PROMPT], params(salt))[0]

        first = run("alice")
        assert first.num_cached_tokens == 0
        assert run("bob").num_cached_tokens == 0  # another tenant: nothing to reuse
        assert run(None).num_cached_tokens == 0  # nor for unsalted requests
        again = run("alice")
        assert again.num_cached_tokens == 144  # its own blocks: every full one
        assert run(None).num_cached_tokens == 144  # unsalted requests share among themselves, as before
        assert again.token_ids == first.token_ids


def test_store_is_shared_only_within_a_salt(tiny, tmp_path):
    url = f"file://{tmp_path}/chunks"
    common = dict(progress=False, store=url, fetch_mode="sync", kv_quality="lossless", chunk_size=32,
                  enable_prefix_caching=False,  # every hit below comes from the store
                  fetch_policy="always")  # and is fetched: on tiny-random computing is about as cheap
    with LLM("tiny-random", **common) as writer:
        want = writer.generate([PROMPT], params("alice"))[0].token_ids
        writer.flush()
        keys = writer.engine.kv_manager.key_fn
    store = open_store(url)
    assert all(store.contains(keys(PROMPT, "alice")))
    assert not any(store.contains(keys(PROMPT))) and not any(store.contains(keys(PROMPT, "bob")))
    with LLM("tiny-random", **common) as reader:
        def run(salt):
            out = reader.generate([PROMPT], params(salt))[0]
            assert out.token_ids == want
            return out

        assert run("bob").num_fetched_tokens == 0  # cannot use, or even see, alice's chunks
        assert run(None).num_fetched_tokens == 0
        assert reader.engine.kv_manager.stats.prefix_hit_tokens == 0
        assert run("alice").num_fetched_tokens == 128  # alice's own: four chunks
        reader.flush()
        assert run(None).num_fetched_tokens == 128  # the unsalted request above was saved for everyone
    store.close()
