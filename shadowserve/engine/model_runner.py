"""Turns a scheduled step into model inputs (tokens, positions, slots, block tables), runs it, samples."""

from __future__ import annotations

import numpy as np
import torch

from shadowserve.engine.kv_pool import KVPool
from shadowserve.engine.request import Request
from shadowserve.engine.sampler import Sampler
from shadowserve.engine.scheduler import ScheduledChunk
from shadowserve.model.attention import (
    AttentionMetadata,
    DecodeSequence,
    PrefillSlice,
    causal_mask_with_context,
)
from shadowserve.model.llama import LlamaForCausalLM


def _token_slice(req: Request, start: int, end: int) -> list[int]:
    prompt = req.prompt_token_ids
    if start >= len(prompt):
        off = len(prompt)
        return req.output_token_ids[start - off : end - off]
    if end <= len(prompt):
        return prompt[start:end]
    return prompt[start:] + req.output_token_ids[: end - len(prompt)]


# Decode steps whose longest context reaches this many tokens attend one sequence at a time on the
# CPU (attention.DecodeSequence); shorter ones as one padded batch, whose per-step cost is lower.
PER_SEQUENCE_DECODE_MIN_CONTEXT = 512


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, kv_pool: KVPool, sampler: Sampler) -> None:
        self.model, self.kv_pool, self.sampler = model, kv_pool, sampler
        self.block_size = kv_pool.block_size
        self.device = model.device
        self.on_gpu = self.device.type == "cuda"
        self._decode_scratch: torch.Tensor | None = None

    def _decode_workspace(self, rows: int) -> torch.Tensor:
        """A reused [2, rows, block_size, kv_heads, head_dim] buffer the decode gather writes into.

        A fresh multi-MB tensor per layer costs its page faults every time (the gather took 2.3x
        as long); this one grows to the largest decode batch seen and stays.
        """
        buf = self._decode_scratch
        if buf is None or buf.shape[1] < rows:
            shape = (2, rows) + tuple(self.kv_pool.tensor.shape[3:])
            buf = self._decode_scratch = torch.empty(shape, dtype=self.kv_pool.tensor.dtype, device=self.device)
        return buf

    def _context_blocks(self, blocks: np.ndarray, tokens: int) -> tuple[int | None, torch.Tensor | None]:
        """The blocks holding a sequence's first ``tokens``: their first id if they are one contiguous
        run (attention reads them in place), else their table (attention gathers them)."""
        used = blocks[: -(-tokens // self.block_size)]
        if len(used) == 1 or (np.diff(used) == 1).all():
            return int(used[0]), None
        return None, torch.as_tensor(used, device=self.device)

    def _add_decode_metadata(self, meta: AttentionMetadata, decodes: list[ScheduledChunk]) -> None:
        """Per-sequence block tables for long contexts on the CPU; else padded tables and a mask."""
        bs = self.block_size
        ctx = np.array([c.request.num_computed_tokens + 1 for c in decodes])
        max_blocks = int(-(-ctx.max() // bs))
        if not self.on_gpu and ctx.max() >= PER_SEQUENCE_DECODE_MIN_CONTEXT:
            meta.decode_sequences = [
                DecodeSequence(int(n), torch.as_tensor(c.request.block_ids[: -(-int(n) // bs)], device=self.device))
                for c, n in zip(decodes, ctx)
            ]
            meta.decode_scratch = self._decode_workspace(max_blocks)
            return
        tables = np.zeros((len(decodes), max_blocks), dtype=np.int64)
        for i, c in enumerate(decodes):
            nb = min(max_blocks, len(c.request.block_ids))
            tables[i, :nb] = c.request.block_ids[:nb]
        meta.decode_block_tables = torch.as_tensor(tables, device=self.device)
        cols = np.arange(max_blocks * bs)
        # Additive mask, built once per step: SDPA would convert a boolean one in every layer.
        bias = np.where(cols[None, :] < ctx[:, None], 0.0, -np.inf).astype(np.float32)
        dtype = self.kv_pool.tensor.dtype
        meta.decode_mask = torch.as_tensor(bias, device=self.device).to(dtype)[:, None, None, :]
        meta.decode_scratch = self._decode_workspace(len(decodes) * max_blocks)

    def run(self, chunks: list[ScheduledChunk]) -> dict[str, int]:
        """Run one step; returns the sampled token of every request whose chunk completed it."""
        decodes = [c for c in chunks if c.num_tokens == 1]
        prefills = [c for c in chunks if c.num_tokens > 1]
        ordered = decodes + prefills
        bs = self.block_size
        ids: list[int] = []
        positions: list[np.ndarray] = []
        slots: list[np.ndarray] = []
        sample_rows: list[int] = []
        sample_reqs: list[Request] = []
        meta = AttentionMetadata(slot_mapping=None, num_decode=len(decodes))  # type: ignore[arg-type]
        row = 0
        for c in ordered:
            req, n = c.request, c.num_tokens
            start = req.num_computed_tokens
            ids.extend(_token_slice(req, start, start + n))
            pos = np.arange(start, start + n)
            blocks = np.asarray(req.block_ids, dtype=np.int64)
            positions.append(pos)
            slots.append(blocks[pos // bs] * bs + pos % bs)
            if n > 1:
                piece = PrefillSlice(row, row + n, start)
                if start > 0:
                    piece.first_block, piece.block_table = self._context_blocks(blocks, start + n)
                    if not self.on_gpu:  # the GPU kernels take a bottom-right causal bias instead
                        piece.mask = causal_mask_with_context(n, start, self.device)
                meta.prefills.append(piece)
            row += n
            if c.completes:
                sample_rows.append(row - 1)
                sample_reqs.append(req)
        if decodes:
            self._add_decode_metadata(meta, decodes)
        meta.slot_mapping = torch.as_tensor(np.concatenate(slots), device=self.device)
        input_ids = torch.as_tensor(ids, dtype=torch.long, device=self.device)
        pos_t = torch.as_tensor(np.concatenate(positions), device=self.device)
        rows_t = torch.as_tensor(sample_rows, dtype=torch.long, device=self.device)  # uploaded before the forward
        hidden = self.model(input_ids, pos_t, self.kv_pool.tensor, meta)
        if not sample_rows:
            if self.on_gpu:
                # Saves of this step's chunks are read by another process (or stream) next: the KV
                # must be in the pool when the step returns, as it is on the CPU.
                torch.cuda.current_stream(self.device).synchronize()
            return {}
        logits = self.model.compute_logits(hidden[rows_t])
        tokens = self.sampler.sample(logits, sample_reqs)
        return {req.request_id: tok for req, tok in zip(sample_reqs, tokens)}
