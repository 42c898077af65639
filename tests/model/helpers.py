"""Run a loaded model directly over a KV pool, outside the engine, to compare logits."""

from __future__ import annotations

import torch

from shadowserve.engine.kv_pool import KVPool
from shadowserve.model.attention import AttentionMetadata, PrefillSlice, causal_mask_with_context


def prefill_logits(model, pool: KVPool, token_ids: torch.Tensor, start: int = 0, as_view: bool = False) -> torch.Tensor:
    """Logits for tokens [start, len) when positions [0, start) are already in the pool (blocks 0, 1, ...)."""
    bs = pool.block_size
    n = token_ids.shape[0] - start
    meta = AttentionMetadata(slot_mapping=torch.arange(start, start + n), prefills=[PrefillSlice(0, n, start)])
    if start:
        if as_view:  # blocks 0.. are contiguous: exercise the copy-free path
            meta.prefills[0].first_block = 0
        else:
            meta.prefills[0].block_table = torch.arange(-(-(start + n) // bs))
        meta.prefills[0].mask = causal_mask_with_context(n, start, torch.device("cpu"))
    hidden = model(token_ids[start:], torch.arange(start, start + n), pool.tensor, meta)
    return model.compute_logits(hidden)


def decode_logits(model, pool: KVPool, token_id: int, position: int) -> torch.Tensor:
    """Logits for one token at ``position`` through the batched decode path (blocks 0, 1, ... in order)."""
    bs = pool.block_size
    nb = position // bs + 1
    meta = AttentionMetadata(
        slot_mapping=torch.tensor([position]),
        num_decode=1,
        decode_block_tables=torch.arange(nb).unsqueeze(0),
        decode_mask=(torch.arange(nb * bs) <= position)[None, None, None, :],
    )
    hidden = model(torch.tensor([token_id]), torch.tensor([position]), pool.tensor, meta)
    return model.compute_logits(hidden)[0]
