"""KV targets: a chunk written into a paged layout and gathered back is the same chunk, for our
engine's layout and vLLM's CPU head-major layout, with contiguous, scattered and skipped blocks."""

from __future__ import annotations

import pytest
import torch

from shadowserve.dataplane.kv_targets import kv_target

L, H, D, BS, NB, CHUNK = 2, 3, 8, 4, 16, 12  # 3 blocks per chunk


def pool(layout: str) -> torch.Tensor:
    shape = (L, 2, NB, BS, H, D) if layout == "engine" else (L, NB, H, 2, BS, D)
    return torch.zeros(shape)


def token_kv(p: torch.Tensor, layout: str, block: int) -> torch.Tensor:
    """The block's KV as [L, 2, BS, H, D], whatever the layout."""
    if layout == "engine":
        return p[:, :, block]
    return p[:, block].permute(0, 2, 3, 1, 4)  # [L, H, 2, BS, D] -> [L, 2, BS, H, D]


@pytest.mark.parametrize("layout", ["engine", "head_major"])
@pytest.mark.parametrize("blocks", [(4, 5, 6), (9, 2, 7), (-1, 11, 12)])
def test_scatter_then_gather_round_trips(layout, blocks):
    p = pool(layout)
    target = kv_target(p, CHUNK, layout)
    chunk = torch.randn(L, 2, CHUNK, H, D)
    plan = target.plan(blocks)
    view = target.direct_view(plan)
    if view is not None:
        view.copy_(chunk)
    else:
        target.scatter(plan, chunk)
    for i, b in enumerate(blocks):
        if b >= 0:
            assert torch.equal(token_kv(p, layout, b), chunk[:, :, i * BS : (i + 1) * BS])
    assert int((p != 0).sum()) == chunk[:, :, : BS].numel() * sum(b >= 0 for b in blocks)  # nothing else
    if -1 not in blocks:
        out = torch.empty_like(chunk)
        target.gather(plan, out)
        assert torch.equal(out, chunk)


def test_head_major_never_views_a_chunk_in_place():
    target = kv_target(pool("head_major"), CHUNK, "head_major")
    assert target.direct_view(target.plan((0, 1, 2))) is None


def test_plan_groups_blocks_into_contiguous_runs():
    from shadowserve.dataplane.kv_targets import _plan

    assert _plan((4, 5, 6, 7)).runs == ((0, 4, 4),)
    assert _plan((4, 5, 9, 10)).runs == ((0, 4, 2), (2, 9, 2))
    assert _plan((-1, 5, 6, 3)).runs == ((1, 5, 2), (3, 3, 1))
    assert _plan((7, 6)).runs == ((0, 7, 1), (1, 6, 1))
