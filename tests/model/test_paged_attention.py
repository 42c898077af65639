"""Paged attention's paths against plain attention: decode (one padded batch; one sequence at a time)
and a prefill after cached context (one masked call; query blocks)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from shadowserve.model import attention
from shadowserve.model.attention import (
    AttentionMetadata,
    DecodeSequence,
    PrefillSlice,
    causal_mask_with_context,
    paged_attention,
)

BS, KV_HEADS, GROUP, HEAD_DIM, BLOCKS = 4, 2, 3, 8, 64


def _setup(contexts: list[int]):
    """A random pool and one scattered block table per sequence (blocks shuffled across sequences)."""
    gen = torch.Generator().manual_seed(0)
    layer = torch.randn(2, BLOCKS, BS, KV_HEADS, HEAD_DIM, generator=gen)
    ids = torch.randperm(BLOCKS, generator=gen).tolist()
    tables = []
    for n in contexts:
        nb = -(-n // BS)
        tables.append(torch.tensor(ids[:nb]))
        ids = ids[nb:]
    q = torch.randn(len(contexts), KV_HEADS * GROUP, HEAD_DIM, generator=gen)
    new_k = torch.randn(len(contexts), KV_HEADS, HEAD_DIM, generator=gen)
    new_v = torch.randn(len(contexts), KV_HEADS, HEAD_DIM, generator=gen)
    # each sequence's new token goes to the slot of its last position
    slots = torch.tensor([int(t[(n - 1) // BS]) * BS + (n - 1) % BS for t, n in zip(tables, contexts)])
    return layer, tables, q, new_k, new_v, slots


def _reference(layer, tables, contexts, q):
    outs = []
    for i, (t, n) in enumerate(zip(tables, contexts)):
        k = layer[0][t].reshape(-1, KV_HEADS, HEAD_DIM)[:n].transpose(0, 1)
        v = layer[1][t].reshape(-1, KV_HEADS, HEAD_DIM)[:n].transpose(0, 1)
        o = F.scaled_dot_product_attention(q[i].view(KV_HEADS, GROUP, HEAD_DIM), k, v)
        outs.append(o.reshape(KV_HEADS * GROUP, HEAD_DIM))
    return torch.stack(outs)


def test_both_decode_paths_match_plain_attention():
    contexts = [37, 5, 61, 16]
    layer, tables, q, k, v, slots = _setup(contexts)

    batched_layer = layer.clone()
    max_blocks = max(len(t) for t in tables)
    padded = torch.zeros(len(contexts), max_blocks, dtype=torch.long)
    for i, t in enumerate(tables):
        padded[i, : len(t)] = t
    mask = (torch.arange(max_blocks * BS)[None, :] < torch.tensor(contexts)[:, None])[:, None, None, :]
    meta = AttentionMetadata(slot_mapping=slots, num_decode=len(contexts), decode_block_tables=padded,
                             decode_mask=mask)
    batched = paged_attention(q, k, v, batched_layer, meta, torch.empty_like(q))

    per_seq_layer = layer.clone()
    seqs = [DecodeSequence(n, t) for n, t in zip(contexts, tables)]
    scratch = torch.full((2, max_blocks, BS, KV_HEADS, HEAD_DIM), float("nan"))  # stale data must not leak
    meta = AttentionMetadata(slot_mapping=slots, num_decode=len(contexts), decode_sequences=seqs,
                             decode_scratch=scratch)
    per_seq = paged_attention(q, k, v, per_seq_layer, meta, torch.empty_like(q))

    assert torch.equal(batched_layer, per_seq_layer)  # both wrote the new K/V to the same slots
    expected = _reference(per_seq_layer, tables, contexts, q)
    torch.testing.assert_close(batched, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(per_seq, expected, rtol=1e-5, atol=1e-5)
    # the new token's own K/V takes part: attention over the context without it differs
    without = _reference(layer, tables, contexts, q)
    assert not torch.allclose(per_seq, without, atol=1e-3)


@pytest.mark.parametrize("query_block", [1000, 8, 7])
def test_prefill_after_cached_context_matches_plain_causal_attention(monkeypatch, query_block):
    """37 new tokens after 23 cached ones, in one masked call or in query blocks (8 divides no edge)."""
    monkeypatch.setattr(attention, "PREFILL_QUERY_BLOCK", query_block)
    ctx, n = 23, 37
    gen = torch.Generator().manual_seed(1)
    layer = torch.randn(2, BLOCKS, BS, KV_HEADS, HEAD_DIM, generator=gen)
    table = torch.randperm(BLOCKS, generator=gen)[: -(-(ctx + n) // BS)]
    q = torch.randn(n, KV_HEADS * GROUP, HEAD_DIM, generator=gen)
    k = torch.randn(n, KV_HEADS, HEAD_DIM, generator=gen)
    v = torch.randn(n, KV_HEADS, HEAD_DIM, generator=gen)
    pos = torch.arange(ctx, ctx + n)
    slots = table[pos // BS] * BS + pos % BS
    meta = AttentionMetadata(slot_mapping=slots, prefills=[
        PrefillSlice(0, n, ctx, block_table=table, mask=causal_mask_with_context(n, ctx, torch.device("cpu")))])
    got = paged_attention(q, k, v, layer.clone(), meta, torch.empty_like(q))

    keys = layer[0][table].reshape(-1, KV_HEADS, HEAD_DIM)[:ctx]
    values = layer[1][table].reshape(-1, KV_HEADS, HEAD_DIM)[:ctx]
    keys, values = torch.cat([keys, k]), torch.cat([values, v])  # the whole sequence, in order
    want = torch.empty_like(q)
    for i in range(n):  # token ctx + i sees positions 0 .. ctx + i
        kk = keys[: ctx + i + 1].transpose(0, 1).repeat_interleave(GROUP, 0)
        vv = values[: ctx + i + 1].transpose(0, 1).repeat_interleave(GROUP, 0)
        want[i] = F.scaled_dot_product_attention(q[i][:, None], kk, vv)[:, 0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
