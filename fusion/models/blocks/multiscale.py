"""Several magnifications of the same slides: CrossViT's two branches fused by CLS-token
cross-attention (Chen et al., ICCV 2021), or MEDUSA's one shared self-attention body with a head
per scale (Aboutalebi et al., 2021). Tokens of every scale are [B, N_s, D], already embedded."""

from __future__ import annotations

import torch
from torch import nn

from fusion.models.blocks.cross import CLSFusion
from fusion.models.blocks.lightning import TileEncoder
from fusion.models.blocks.pooling import GatedAttentionPool


class CrossScaleFusion(nn.Module):
    """CrossViT for bags: the coarse scale has its own tile encoder and attention pool (its CLS);
    the fine and coarse CLS tokens read each other's tiles (`CLSFusion`): cost O(N_fine + N_coarse)."""

    def __init__(self, dim: int, layers: int = 1, heads: int = 4, block: int = 64, dropout: float = 0.1):
        super().__init__()
        self.encoder = TileEncoder(dim, layers, heads, block, dropout)
        self.pool = GatedAttentionPool(dim, dim // 2, dropout)
        self.fusion = CLSFusion(dim, heads, 1, dropout)
        self.missing = nn.Parameter(torch.zeros(dim))  # CLS of a patient without coarse tiles

    def forward(self, fine: torch.Tensor, fine_mask: torch.Tensor, fine_cls: torch.Tensor, coarse: torch.Tensor,
                coarse_mask: torch.Tensor, coarse_coords: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (fine CLS [B, D], coarse CLS [B, D]) after one exchange."""
        coarse = self.encoder(coarse, coarse_mask, coarse_coords)
        coarse_cls, _ = self.pool(coarse, coarse_mask)
        coarse_cls = torch.where(coarse_mask.any(1, keepdim=True), coarse_cls, self.missing.to(coarse_cls.dtype))
        fine_cls, coarse_cls, _ = self.fusion(fine_cls, fine, fine_mask, coarse_cls, coarse, coarse_mask)
        return fine_cls, coarse_cls


class SharedScaleBody(nn.Module):
    """MEDUSA for bags: one tile encoder over the tiles of all scales together (a learned embedding
    marks each tile's scale; with positions, the spatial order interleaves scales, so a block of
    local attention holds one region at every magnification), then one pooling head per extra scale."""

    def __init__(self, dim: int, n_scales: int, layers: int = 1, heads: int = 4, block: int = 64,
                 dropout: float = 0.1):
        super().__init__()
        self.scale_embed = nn.Parameter(torch.zeros(n_scales, dim))
        self.body = TileEncoder(dim, layers, heads, block, dropout)
        self.heads = nn.ModuleList(GatedAttentionPool(dim, dim // 2, dropout) for _ in range(n_scales - 1))
        self.missing = nn.Parameter(torch.zeros(n_scales - 1, dim))

    def forward(self, tokens: list[torch.Tensor], masks: list[torch.Tensor],
                coords: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """tokens/masks/coords per scale (the first is the main scale) -> (the main scale's tokens
        after the shared body [B, N_0, D], one pooled embedding per extra scale [B, D])."""
        sizes = [t.shape[1] for t in tokens]
        x = torch.cat([t + self.scale_embed[i].to(t.dtype) for i, t in enumerate(tokens)], 1)
        mask = torch.cat(masks, 1)
        pos = torch.cat(coords, 1) if coords is not None else None
        parts = list(self.body(x, mask, pos).split(sizes, 1))
        pooled = []
        for i, (head, part) in enumerate(zip(self.heads, parts[1:], strict=True)):
            z, _ = head(part, masks[i + 1])
            pooled.append(torch.where(masks[i + 1].any(1, keepdim=True), z, self.missing[i].to(z.dtype)))
        return parts[0], pooled
