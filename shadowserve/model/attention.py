"""Paged attention over the engine's KV pool, through block tables and slot mappings.

The pool is one tensor ``[layers, 2 (K,V), num_blocks, block_size, kv_heads, head_dim]``. New
K/V rows are scattered to their slots; attention gathers each sequence's context by block table.
A step mixes decode tokens (one per sequence, attended as one padded batch) with prefill chunks
(attended one sequence at a time, causally, over whatever context the pool already holds).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class PrefillSlice:
    """One sequence's prefill chunk inside the flat token batch."""

    start: int  # first row of this chunk in the flat batch
    end: int  # one past its last row
    context_before: int  # tokens of this sequence already in the pool (cached prefix or earlier chunks)
    block_table: torch.Tensor | None = None  # blocks covering the whole context, when context_before > 0
    first_block: int | None = None  # set instead of block_table when those blocks are one contiguous run
    mask: torch.Tensor | None = None  # [n, context] boolean, when context_before > 0


@dataclass
class DecodeSequence:
    """One decode sequence's context in the pool, for the per-sequence (long-context) decode path."""

    context: int  # tokens to attend, its new token included
    block_table: torch.Tensor  # the blocks holding them, in order


@dataclass
class AttentionMetadata:
    """Everything attention needs for one engine step; built once per step, shared by all layers."""

    slot_mapping: torch.Tensor  # [N] flat slot index (block * block_size + offset) for every new token
    num_decode: int = 0  # the first num_decode rows are decode tokens, one per sequence
    decode_block_tables: torch.Tensor | None = None  # [B, max_blocks], padded with block 0
    decode_mask: torch.Tensor | None = None  # [B, 1, 1, max_blocks * block_size]: bool (True = attend) or additive
    decode_scratch: torch.Tensor | None = None  # [2, >= rows gathered at once, block_size, kv_heads, head_dim]
    decode_sequences: list[DecodeSequence] | None = None  # set instead of tables and mask: per-sequence path
    prefills: list[PrefillSlice] = field(default_factory=list)


PREFILL_QUERY_BLOCK = 256  # new tokens per attention call in a CPU prefill with cached context


def causal_mask_with_context(n_new: int, context_before: int, device: torch.device) -> torch.Tensor:
    """Boolean [n_new, context_before + n_new] mask: new token i sees everything up to its own position."""
    total = context_before + n_new
    cols = torch.arange(total, device=device)
    rows = torch.arange(n_new, device=device).unsqueeze(1) + context_before
    return cols.unsqueeze(0) <= rows


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_layer: torch.Tensor,
    meta: AttentionMetadata,
    out: torch.Tensor,
) -> torch.Tensor:
    """Write this step's K/V into the pool, then attend. Writes the result into ``out``.

    q: [N, heads, head_dim]; k, v: [N, kv_heads, head_dim]; kv_layer: [2, blocks, block_size, kv_heads, head_dim].
    """
    k_cache, v_cache = kv_layer[0], kv_layer[1]
    kv_heads, head_dim = k.shape[1], k.shape[2]
    k_cache.view(-1, kv_heads, head_dim).index_copy_(0, meta.slot_mapping, k)
    v_cache.view(-1, kv_heads, head_dim).index_copy_(0, meta.slot_mapping, v)

    b = meta.num_decode
    if b and meta.decode_sequences is not None:
        _decode_per_sequence(q, k_cache, v_cache, meta, out)
    elif b:
        # index_select copies whole blocks with memcpy; advanced indexing is several times slower here.
        flat = meta.decode_block_tables.view(-1)
        if meta.decode_scratch is not None:
            kd = torch.index_select(k_cache, 0, flat, out=meta.decode_scratch[0, : flat.numel()])
            vd = torch.index_select(v_cache, 0, flat, out=meta.decode_scratch[1, : flat.numel()])
        else:
            kd, vd = k_cache.index_select(0, flat), v_cache.index_select(0, flat)
        kd = kd.view(b, -1, kv_heads, head_dim).transpose(1, 2)
        vd = vd.view(b, -1, kv_heads, head_dim).transpose(1, 2)
        # Grouped-query decode: the query heads sharing a KV head become that head's query rows,
        # so each K/V row is read once instead of once per query head.
        group = q.shape[1] // kv_heads
        qd = q[:b].reshape(b, kv_heads, group, head_dim)
        o = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=meta.decode_mask)
        out[:b] = o.reshape(b, kv_heads * group, head_dim)

    for p in meta.prefills:
        qs = q[p.start : p.end].transpose(0, 1).unsqueeze(0)
        if q.is_cuda:
            o = _prefill_cuda(qs, k, v, k_cache, v_cache, p)
        elif p.context_before == 0:
            ks = k[p.start : p.end].transpose(0, 1).unsqueeze(0)
            vs = v[p.start : p.end].transpose(0, 1).unsqueeze(0)
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True)
        else:
            o = _prefill_with_context(qs, k_cache, v_cache, p)
        out[p.start : p.end] = o[0].transpose(0, 1)
    return out


def _prefill_with_context(qs: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          p: PrefillSlice) -> torch.Tensor:
    """A CPU prefill chunk after ``context_before`` cached tokens (a fetched or locally cached prefix).

    One call under the whole ``[n, context + n]`` mask also computes every masked-out pair: for a long
    chunk that is the full rectangle, up to twice a causal prefill's attention work (measured: 3846 tokens
    after 256 cached took 1.4x a 4102-token prefill from scratch). In query blocks, new tokens ``[i, j)``
    attend only keys ``[0, context + j)``, so the work is ``n * context + n * n / 2`` plus half a block per
    row. A chunk within one block (a suffix after a fetched prefix) is one call, as before.
    """
    n = p.end - p.start
    ks, vs = _context_kv(k_cache, v_cache, p, p.context_before + n)
    ks, vs = ks.transpose(0, 1)[None], vs.transpose(0, 1)[None]
    if n <= PREFILL_QUERY_BLOCK:
        return F.scaled_dot_product_attention(qs, ks, vs, attn_mask=p.mask, enable_gqa=True)
    out = torch.empty_like(qs)
    for i in range(0, n, PREFILL_QUERY_BLOCK):
        j = min(n, i + PREFILL_QUERY_BLOCK)
        keys = p.context_before + j
        out[:, :, i:j] = F.scaled_dot_product_attention(qs[:, :, i:j], ks[:, :, :keys], vs[:, :, :keys],
                                                        attn_mask=p.mask[i:j, :keys], enable_gqa=True)
    return out


def _decode_per_sequence(q, k_cache, v_cache, meta: AttentionMetadata, out: torch.Tensor) -> None:
    """Decode attention one sequence at a time: gather its blocks, then two matmuls and a softmax.

    For long contexts on the CPU this beats one padded batch through the fused SDPA kernel, which
    is slow on the ``[T, kv_heads, head_dim]`` layout of gathered blocks where matmuls are not, and
    each sequence attends exactly its own context (no padding, no mask). The gather reuses one
    small workspace, so the copy it reads back is still in cache. Attending contiguous blocks in
    place without the copy was measured slower (docs/performance.md).
    """
    kv_heads, head_dim = k_cache.shape[-2], k_cache.shape[-1]
    group = q.shape[1] // kv_heads
    scale = head_dim**-0.5
    for i, seq in enumerate(meta.decode_sequences):
        n = len(seq.block_table)
        if meta.decode_scratch is not None:
            k = torch.index_select(k_cache, 0, seq.block_table, out=meta.decode_scratch[0, :n])
            v = torch.index_select(v_cache, 0, seq.block_table, out=meta.decode_scratch[1, :n])
        else:
            k, v = k_cache.index_select(0, seq.block_table), v_cache.index_select(0, seq.block_table)
        k = k.view(-1, kv_heads, head_dim)[: seq.context]
        v = v.view(-1, kv_heads, head_dim)[: seq.context]
        scores = torch.matmul(q[i].view(kv_heads, group, head_dim), k.permute(1, 2, 0)).mul_(scale)
        torch.softmax(scores, -1, out=scores)
        out[i] = torch.matmul(scores, v.transpose(0, 1)).view(kv_heads * group, head_dim)


def _context_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, p: PrefillSlice, total: int):
    """This sequence's first ``total`` cached K/V rows; a view, no copy, when its blocks are contiguous."""
    kv_heads, head_dim = k_cache.shape[-2], k_cache.shape[-1]
    if p.first_block is not None:
        nb = -(-total // k_cache.shape[1])
        ks = k_cache[p.first_block : p.first_block + nb].view(-1, kv_heads, head_dim)
        vs = v_cache[p.first_block : p.first_block + nb].view(-1, kv_heads, head_dim)
    else:
        ks = k_cache.index_select(0, p.block_table).view(-1, kv_heads, head_dim)
        vs = v_cache.index_select(0, p.block_table).view(-1, kv_heads, head_dim)
    return ks[:total], vs[:total]


def _prefill_cuda(qs, k, v, k_cache, v_cache, p: PrefillSlice) -> torch.Tensor:
    """A prefill chunk on the GPU through the fused (flash / memory-efficient) kernels.

    Those kernels take neither grouped KV heads nor a dense mask at long context, so KV heads are
    repeated and the causal mask is the bottom-right-aligned bias: new token i sees the whole
    cached context plus new tokens up to itself, with no [n, context] mask ever materialized.
    """
    from torch.nn.attention.bias import causal_lower_right

    n = p.end - p.start
    if p.context_before == 0:
        ks, vs = k[p.start : p.end], v[p.start : p.end]
    else:
        ks, vs = _context_kv(k_cache, v_cache, p, p.context_before + n)
    group = qs.shape[1] // ks.shape[1]
    ks = ks.transpose(0, 1).repeat_interleave(group, dim=0)[None]
    vs = vs.transpose(0, 1).repeat_interleave(group, dim=0)[None]
    if p.context_before == 0:
        return F.scaled_dot_product_attention(qs, ks, vs, is_causal=True)
    return F.scaled_dot_product_attention(qs, ks, vs, attn_mask=causal_lower_right(n, ks.shape[2]))
