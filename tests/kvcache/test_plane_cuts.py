"""zstd starts a block at a symbol plane where its own table pays: fewer bytes where planes differ, the
same decoded bytes."""

import dataclasses

import numpy as np
import pytest
import torch
import zstandard

from shadowserve.config import CodecConfig
from shadowserve.kvcache import KVCodec
from shadowserve.kvcache import packing as pk
from shadowserve.kvcache.lossless import CUT_PRICE_NBYTES, MIN_CUT_NBYTES, _paying, _spaced, make_stage
from tests.kvcache.conftest import FINGERPRINT

BIG = (4, 2, 256, 2, 32)  # planes of 16 KiB (8 KiB as nibbles): far enough apart to cut


def _two_kinds(seed: int = 0) -> tuple[np.ndarray, int]:
    """Bytes whose statistics change half way: narrow symbols, then wide ones."""
    rng = np.random.default_rng(seed)
    half = 48 * 1024
    narrow = rng.integers(0, 4, half, dtype=np.uint8)
    wide = rng.binomial(255, 0.5, half).astype(np.uint8)
    return np.concatenate([narrow, wide]), half


def test_a_cut_where_statistics_change_codes_smaller_and_decodes_the_same():
    stage = make_stage("zstd")
    data, half = _two_kinds()
    plain, cut = stage.compress(data), stage.compress(data, [half])
    assert len(cut) < 0.97 * len(plain)
    out = np.empty_like(data)
    stage.decompress_into(cut, out)
    assert np.array_equal(out, data)
    assert zstandard.ZstdDecompressor().decompress(cut) == data.tobytes()  # a standard zstd frame


def test_cuts_too_close_together_or_to_an_end_are_merged():
    n = 10 * MIN_CUT_NBYTES
    assert _spaced([0, 10, MIN_CUT_NBYTES, MIN_CUT_NBYTES + 1, 3 * MIN_CUT_NBYTES, n - 1, n], n) == \
        [MIN_CUT_NBYTES, 3 * MIN_CUT_NBYTES]
    data, half = _two_kinds(1)
    stage = make_stage("zstd")
    assert stage.compress(data, [1, 2, 3]) == stage.compress(data)


def test_a_cut_between_alike_planes_is_not_worth_its_table():
    rng = np.random.default_rng(3)
    alike = rng.integers(0, 16, 64 * 1024, dtype=np.uint8)  # two halves drawn the same way
    data, half = _two_kinds(3)
    assert _paying(alike, [len(alike) // 2]) == []
    assert _paying(data, [half]) == [half]
    stage = make_stage("zstd")
    assert stage.compress(alike, [len(alike) // 2]) == stage.compress(alike)  # one block, as without cuts


def test_the_price_decides_which_cuts_pay():
    """Three segments: a switch of statistics that saves kilobytes, then a small shift worth less than the
    price; a higher price keeps neither, a price of zero keeps both."""
    rng = np.random.default_rng(4)
    n = 16 * 1024
    narrow = rng.integers(0, 4, n, dtype=np.uint8)
    wide = rng.integers(0, 64, n, dtype=np.uint8)
    shifted = rng.integers(0, 60, n, dtype=np.uint8)
    data = np.concatenate([narrow, wide, shifted])
    assert _paying(data, [n, 2 * n]) == [n]
    assert _paying(data, [n, 2 * n], price=0) == [n, 2 * n]
    assert _paying(data, [n, 2 * n], price=100 * CUT_PRICE_NBYTES) == []


@pytest.mark.parametrize("stage", ["deflate", "lz4", "none"])
def test_stages_without_blocks_ignore_cuts(stage):
    s = make_stage(stage)
    data, half = _two_kinds(2)
    assert s.compress(data, [half]) == s.compress(data)


@pytest.mark.parametrize("pack", [True, False])
def test_plane_starts_follow_the_planes(pack):
    codec = KVCodec(CodecConfig(pack_nibbles=pack), FINGERPRINT)
    kv = torch.randn(BIG)
    staging = np.zeros(codec.max_staging_nbytes(BIG), np.uint8)
    header = codec.decompress_into(codec.encode(kv), staging)
    staging = staging[: header.staging_nbytes]
    layout = codec.layout_of(BIG)
    starts = pk.plane_starts(layout, staging)
    assert len(starts) == layout.planes + 1
    step = layout.plane_nbytes // 2 if pack else layout.plane_nbytes
    first = layout.data_offset if pack else layout.symbols_offset
    assert starts == [first + p * step for p in range(layout.planes + 1)]


@pytest.mark.parametrize("block", [0, 16384])
def test_chunks_with_plane_blocks_decode_like_chunks_without(block, monkeypatch):
    codec = KVCodec(CodecConfig(lossless_block=block), FINGERPRINT)
    kv = torch.randn(BIG) * torch.linspace(0.2, 3, BIG[-1])  # channels of many sizes
    blob = codec.encode(kv)
    monkeypatch.setattr(pk, "plane_starts", lambda *_: [])
    uncut = codec.encode(kv)
    assert len(blob) < len(uncut)
    for b in (blob, uncut):
        assert torch.equal(codec.decode(b, torch.empty(BIG)), codec.decode(uncut, torch.empty(BIG)))
    one_stream = KVCodec(dataclasses.replace(codec.config, lossless_block=0), FINGERPRINT)
    assert torch.equal(one_stream.decode(blob, torch.empty(BIG)), codec.decode(blob, torch.empty(BIG)))
