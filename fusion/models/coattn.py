"""`coattn`: genomic-guided co-attention (MCAT, Chen et al., ICCV 2021), linear in tiles.

Genes are grouped (by pathway, from the column prefix `PATHWAY_gene`, or in equal chunks); each
group becomes a token through its own small self-normalising network. The G genomic tokens are
queries that attend over the N tile tokens (an attention of size G x N, never N x N), giving G
genomics-guided image tokens. Each modality then has a small transformer and attention pooling;
the two embeddings are concatenated into the head.

`fusion="cls"` (a model option) replaces the G x N co-attention by CrossViT's CLS-token
cross-attention: the tiles are attention-pooled into an image CLS token and the gene tokens into a
gene CLS token; the image CLS reads the gene tokens and the gene CLS reads the tiles (one query per
side: cost O(N + G)); the two CLS tokens go to the head (docs/cls-cross-attention.md).

Missing modalities: a patient without genomics uses learned "missing" group tokens; a patient
without tiles gets a learned "no image" embedding.
"""

from __future__ import annotations

import torch
from torch import nn

from fusion.models.base import TileModel, check_option, clinical_or_mean
from fusion.models.blocks.cross import CLSFusion
from fusion.models.blocks.pooling import GatedAttentionPool
from fusion.models.registry import register_model


def snn(in_dim: int, out_dim: int, dropout: float) -> nn.Module:
    return nn.Sequential(nn.Linear(in_dim, out_dim), nn.ELU(), nn.AlphaDropout(dropout),
                         nn.Linear(out_dim, out_dim), nn.ELU(), nn.AlphaDropout(dropout))


class GenomicTokens(nn.Module):
    """genomics [B, G_total] -> tokens [B, K, H], one per gene group; missing rows use learned tokens."""

    def __init__(self, groups: list[list[int]], hidden: int, dropout: float):
        super().__init__()
        self.groups = [torch.as_tensor(g, dtype=torch.long) for g in groups]
        for i, g in enumerate(self.groups):
            self.register_buffer(f"idx{i}", g, persistent=False)
        self.nets = nn.ModuleList(snn(len(g), hidden, dropout) for g in groups)
        self.missing = nn.Parameter(torch.zeros(len(groups), hidden))

    def forward(self, genomics: torch.Tensor | None, present: torch.Tensor | None, batch: int) -> torch.Tensor:
        """genomics [B, G] (or None: nobody has any), present [B] -> tokens [B, K, H]."""
        if genomics is None:
            return self.missing[None].expand(batch, -1, -1)
        tokens = torch.stack([net(genomics[:, getattr(self, f"idx{i}")]) for i, net in enumerate(self.nets)], 1)
        return torch.where(present[:, None, None], tokens, self.missing[None].to(tokens.dtype))


class CoAttention(TileModel):
    def __init__(self, in_dim: int, groups: list[list[int]], clinical_dim: int = 0, hidden: int = 128,
                 heads: int = 4, dropout: float = 0.25, n_outputs: int = 1, fusion: str = "coattn"):
        super().__init__(in_dim, n_outputs)
        check_option("fusion", fusion, ("coattn", "cls"))
        self.fusion = fusion
        self.tiles = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.genes = GenomicTokens(groups, hidden, dropout)
        self.coattn = nn.MultiheadAttention(hidden, heads, dropout=dropout, batch_first=True) \
            if fusion == "coattn" else None
        layer = lambda: nn.TransformerEncoderLayer(hidden, heads, 2 * hidden, dropout, batch_first=True)  # noqa: E731
        self.path_tf = nn.TransformerEncoder(layer(), 1) if fusion == "coattn" else None
        self.gene_tf = nn.TransformerEncoder(layer(), 1)
        self.path_pool = GatedAttentionPool(hidden, hidden // 2, dropout) if fusion == "coattn" else None
        self.gene_pool = GatedAttentionPool(hidden, hidden // 2, dropout)
        self.no_image = nn.Parameter(torch.zeros(hidden))
        self.tile_pool = GatedAttentionPool(hidden, hidden // 2, dropout) if fusion == "cls" else None
        self.cls_fusion = CLSFusion(hidden, heads, 1, min(dropout, 0.1)) if fusion == "cls" else None
        self.clinical = nn.Sequential(nn.Linear(clinical_dim, hidden // 2), nn.ReLU()) if clinical_dim else None
        fused = 2 * hidden + (hidden // 2 if clinical_dim else 0)
        self.head = nn.Sequential(nn.Linear(fused, hidden), nn.ReLU(), nn.Dropout(dropout),
                                  nn.Linear(hidden, n_outputs))

    def forward(self, features: torch.Tensor, mask: torch.Tensor, genomics: torch.Tensor | None = None,
                genomics_mask: torch.Tensor | None = None, clinical: torch.Tensor | None = None, **_) -> dict:
        b = features.shape[0]
        h = self.tiles(self.normalise(features))  # [B, N, H]
        g = self.genes(genomics, genomics_mask, b)  # [B, K, H]
        has_tiles = mask.any(1)
        if self.fusion == "cls":
            return self._cls_forward(h, mask, g, has_tiles, clinical, features)
        safe_mask = mask | ~has_tiles[:, None]  # an empty bag attends to padding, then is replaced below
        guided, gene_to_tile = self.coattn(g, h, h, key_padding_mask=~safe_mask)  # [B, K, H], [B, K, N]
        path = self.path_tf(guided)
        path_z, _ = self.path_pool(path, torch.ones(path.shape[:2], dtype=torch.bool, device=path.device))
        path_z = torch.where(has_tiles[:, None], path_z, self.no_image.to(path_z.dtype))
        gene_z, gene_attn = self.gene_pool(self.gene_tf(g), torch.ones(g.shape[:2], dtype=torch.bool, device=g.device))
        attention = (gene_to_tile.float().mean(1) * mask).float()  # tiles weighted by all gene groups
        return self.outputs(self._head(path_z, gene_z, clinical, features),
                            attention=attention / attention.sum(1, keepdim=True).clamp_min(1e-12),
                            group_attention=gene_attn, coattention=gene_to_tile)

    def _cls_forward(self, h, mask, g, has_tiles, clinical, features) -> dict:
        """CrossViT CLS-token fusion: pooled image and gene CLS tokens each read the other modality."""
        img, attn = self.tile_pool(h, mask)
        img = torch.where(has_tiles[:, None], img, self.no_image.to(img.dtype))
        genes = self.gene_tf(g)
        gene_z, gene_attn = self.gene_pool(genes, torch.ones(g.shape[:2], dtype=torch.bool, device=g.device))
        img, gene_z, _ = self.cls_fusion(img, h, mask, gene_z, genes, None)
        return self.outputs(self._head(img, gene_z, clinical, features), attention=attn, group_attention=gene_attn)

    def _head(self, image, genes, clinical, features) -> torch.Tensor:
        parts = [image, genes]
        if self.clinical is not None:
            parts.append(self.clinical(clinical_or_mean(clinical, features, self.clinical[0].in_features)))
        return self.head(torch.cat(parts, 1))


def default_groups(n_genes: int, n_groups: int = 6) -> list[list[int]]:
    return [list(chunk) for chunk in torch.arange(n_genes).chunk(min(n_groups, max(1, n_genes)))]


@register_model("coattn", options=("fusion",))
def build_coattn(in_dim: int, n_outputs: int = 1, hidden: int = 128, dropout: float = 0.25,
                 groups: list[list[int]] | None = None, genomic_dim: int = 16, clinical_dim: int = 0,
                 fusion: str = "coattn", **_) -> CoAttention:
    return CoAttention(in_dim, groups or default_groups(genomic_dim), clinical_dim, hidden, dropout=dropout,
                       n_outputs=n_outputs, fusion=fusion)
