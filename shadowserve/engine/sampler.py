"""Token sampling: greedy, or temperature with top-k / top-p, reproducible per request seed."""

from __future__ import annotations

import torch

from shadowserve.engine.request import Request


class Sampler:
    def __init__(self, seed: int = 0) -> None:
        self._seed = seed
        self._generators: dict[str, torch.Generator] = {}

    def sample(self, logits: torch.Tensor, requests: list[Request]) -> list[int]:
        """One token per row of float32 ``logits`` [M, vocab], row i belonging to ``requests[i]``."""
        if all(r.sampling.greedy for r in requests):
            return logits.argmax(dim=-1).tolist()
        logits = logits.cpu()  # per-request CPU generators: the same seed samples the same tokens anywhere
        out = []
        for row, req in zip(logits, requests):
            sp = req.sampling
            if sp.greedy:
                out.append(int(row.argmax()))
                continue
            row = row / sp.temperature
            if sp.top_k and sp.top_k < row.shape[0]:
                kth = torch.topk(row, sp.top_k).values[-1]
                row = row.masked_fill(row < kth, float("-inf"))
            probs = torch.softmax(row, dim=-1)
            if sp.top_p < 1.0:
                sorted_p, idx = probs.sort(descending=True)
                keep = sorted_p.cumsum(0) - sorted_p < sp.top_p  # always keeps the most likely token
                probs = torch.zeros_like(probs).scatter_(0, idx[keep], sorted_p[keep])
            out.append(int(torch.multinomial(probs, 1, generator=self._generator(req))))
        return out

    def _generator(self, req: Request) -> torch.Generator:
        gen = self._generators.get(req.request_id)
        if gen is None:
            seed = req.sampling.seed if req.sampling.seed is not None else hash((self._seed, req.request_id)) & 0x7FFFFFFF
            gen = torch.Generator().manual_seed(seed)
            self._generators[req.request_id] = gen
        return gen

    def forget(self, request_id: str) -> None:
        self._generators.pop(request_id, None)
