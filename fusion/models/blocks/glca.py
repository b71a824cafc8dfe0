"""Global-local cross-attention and pair-wise cross-attention (DCAL, Zhu et al., CVPR 2022), for bags.

GLCA: the tiles with the highest attention (the top `ratio` of a bag, at most `max_queries`) are
local queries that cross-attend to the whole bag: a full transformer block, residual, norms and
FFN. Their outputs are averaged into a local embedding that the model combines with its global
(attention-pooled) embedding. Cost O(K N) with K <= max_queries: linear in tiles.

PWCA: in training only, another patient's tiles are added as extra keys and values (a distractor),
so the attention is spread over both bags and must learn to hold on to its own evidence; removed at
inference. `distractor` gives, for a batch, each bag's distractor: the next patient of the batch.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fusion.models.blocks.cross import CrossAttentionBlock


def distractor(h: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Each bag's distractor in a batch: the tokens and mask of the next bag (None for one bag)."""
    if h.shape[0] < 2:
        return None
    return h.roll(1, 0), mask.roll(1, 0)


class GlobalLocalCrossAttention(nn.Module):
    """Top-attended tiles as queries over the bag (+ a distractor bag's tiles in training).

    Args:
        dim: token width.
        heads: attention heads.
        ratio: share of a bag's tiles used as local queries (R in DCAL).
        max_queries: cap on local queries per bag, which keeps the cost linear in tiles.
    """

    def __init__(self, dim: int, heads: int = 4, ratio: float = 0.1, max_queries: int = 64, dropout: float = 0.1):
        super().__init__()
        if not 0 < ratio <= 1:
            raise ValueError(f"GlobalLocalCrossAttention: ratio must be in (0, 1], got {ratio}")
        self.ratio, self.max_queries = ratio, max_queries
        self.block = CrossAttentionBlock(dim, heads, dropout)

    def select(self, scores: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Indices [B, K] of each bag's top tiles by `scores` [B, N], and which are used [B, K]."""
        n_real = mask.sum(1)
        k_bag = torch.clamp(torch.ceil(n_real.float() * self.ratio).long(), max=self.max_queries)
        k_bag = torch.minimum(k_bag, n_real)  # 0 for a bag without tiles
        k = max(1, min(int(k_bag.max()), scores.shape[1]))
        idx = scores.float().masked_fill(~mask, float("-inf")).topk(k, dim=1).indices
        used = torch.arange(k, device=scores.device)[None] < k_bag[:, None]
        return idx, used

    def forward(self, h: torch.Tensor, mask: torch.Tensor, scores: torch.Tensor,
                extra: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """h [B, N, D], mask [B, N], scores [B, N] (e.g. pooling attention, no gradient needed),
        extra: distractor (tokens [B, M, D], mask [B, M]) added to the keys ->
        (local embedding [B, D] (zeros for a bag without tiles), local query indices [B, K])."""
        idx, used = self.select(scores.detach(), mask)
        queries = torch.gather(h, 1, idx[..., None].expand(-1, -1, h.shape[-1]))
        ctx, ctx_mask = h, mask
        if extra is not None:
            ctx, ctx_mask = torch.cat([h, extra[0]], 1), torch.cat([mask, extra[1]], 1)
        out, _ = self.block(queries, ctx, ctx_mask)
        weight = used.to(out.dtype)[..., None]
        local = (out * weight).sum(1) / weight.sum(1).clamp_min(1.0)
        return local, idx


def default_queries(n_tiles: int, ratio: float, max_queries: int) -> int:
    """How many local queries a bag of `n_tiles` gets (for docs and tests)."""
    return min(max_queries, math.ceil(n_tiles * ratio), n_tiles)
