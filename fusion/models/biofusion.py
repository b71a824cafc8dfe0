"""`biofusion`: BioFusionNet (Mondol et al., 2024), multimodal survival for ER+ breast cancer.

    tiles: several encoders' features per tile [B, N, sum D_e]
      -> per-encoder projections -> VAE (per tile): z ~ N(mu, sigma) [B, N, L], reconstruction + KL
         as an auxiliary loss, mu used at inference
      -> attention pooling with M heads (linear in N) -> image tokens [B, M, H]
    genes: gene groups -> SNN tokens [B, K, H] (learned tokens when genomics are missing)
    co-dual-cross-attention: image tokens attend to gene tokens and gene tokens to image tokens
    clinical: FFN -> [B, H/2]
    head: concat -> risk (trained with the weighted Cox loss)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fusion.models.base import TileModel, clinical_or_mean
from fusion.models.coattn import GenomicTokens, default_groups
from fusion.models.registry import register_model


class TileVAE(nn.Module):
    def __init__(self, encoder_dims: list[int], hidden: int, latent: int):
        super().__init__()
        self.dims = list(encoder_dims)
        self.proj = nn.ModuleList(nn.Sequential(nn.Linear(d, hidden), nn.GELU()) for d in self.dims)
        self.mu = nn.Linear(hidden * len(self.dims), latent)
        self.logvar = nn.Linear(hidden * len(self.dims), latent)
        self.decoder = nn.Sequential(nn.Linear(latent, hidden), nn.GELU(), nn.Linear(hidden, sum(self.dims)))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, N, sum D] -> (z [B, N, L], per-bag VAE loss [B])."""
        parts = torch.split(x, self.dims, dim=-1)
        h = torch.cat([p(part) for p, part in zip(self.proj, parts, strict=True)], -1)
        mu, logvar = self.mu(h), self.logvar(h).clamp(-8, 8)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if self.training else mu
        recon = F.mse_loss(self.decoder(z), x, reduction="none").mean(-1)
        kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).mean(-1)
        m = mask.float()
        per_bag = ((recon + 1e-3 * kl) * m).sum(1) / m.sum(1).clamp_min(1)
        return z, per_bag


class BioFusionNet(TileModel):
    def __init__(self, in_dim: int, encoder_dims: list[int] | None = None, groups: list[list[int]] | None = None,
                 clinical_dim: int = 0, hidden: int = 128, latent: int = 64, image_tokens: int = 4,
                 heads: int = 4, dropout: float = 0.25, n_outputs: int = 1, vae_weight: float = 0.1):
        super().__init__(in_dim, n_outputs)
        self.vae = TileVAE(encoder_dims or [in_dim], hidden, latent)
        self.tile = nn.Sequential(nn.Linear(latent, hidden), nn.GELU(), nn.Dropout(dropout))
        self.attn_v, self.attn_u = nn.Linear(hidden, hidden // 2), nn.Linear(hidden, hidden // 2)
        self.attn_w = nn.Linear(hidden // 2, image_tokens)
        self.genes = GenomicTokens(groups or default_groups(16), hidden, dropout)
        self.img_to_gene = nn.MultiheadAttention(hidden, heads, dropout=dropout, batch_first=True)
        self.gene_to_img = nn.MultiheadAttention(hidden, heads, dropout=dropout, batch_first=True)
        self.no_image = nn.Parameter(torch.zeros(image_tokens, hidden))
        self.clinical = nn.Sequential(nn.Linear(clinical_dim, hidden // 2), nn.GELU(), nn.Dropout(dropout),
                                      nn.Linear(hidden // 2, hidden // 2)) if clinical_dim else None
        fused = 2 * hidden + (hidden // 2 if clinical_dim else 0)
        self.head = nn.Sequential(nn.Linear(fused, hidden), nn.GELU(), nn.Dropout(dropout),
                                  nn.Linear(hidden, n_outputs))
        self.vae_weight = vae_weight

    def forward(self, features: torch.Tensor, mask: torch.Tensor, genomics: torch.Tensor | None = None,
                genomics_mask: torch.Tensor | None = None, clinical: torch.Tensor | None = None, **_) -> dict:
        b = features.shape[0]
        z, vae_loss = self.vae(self.normalise(features), mask)
        h = self.tile(z)  # [B, N, H]
        logits = self.attn_w(torch.tanh(self.attn_v(h)) * torch.sigmoid(self.attn_u(h))).transpose(1, 2).float()
        attn = torch.nan_to_num(torch.softmax(logits.masked_fill(~mask[:, None, :], float("-inf")), -1), nan=0.0)
        img = torch.einsum("bmn,bnh->bmh", attn.to(h.dtype), h)  # [B, M, H]
        has_tiles = mask.any(1)
        img = torch.where(has_tiles[:, None, None], img, self.no_image[None].to(img.dtype))
        genes = self.genes(genomics, genomics_mask, b)  # [B, K, H]
        img_ctx, _ = self.img_to_gene(img, genes, genes)  # image tokens read the genes
        gene_ctx, _ = self.gene_to_img(genes, img, img)  # gene tokens read the image
        parts = [(img + img_ctx).mean(1), (genes + gene_ctx).mean(1)]
        if self.clinical is not None:
            parts.append(self.clinical(clinical_or_mean(clinical, features, self.clinical[0].in_features)))
        return self.outputs(self.head(torch.cat(parts, 1)), attention=attn.mean(1),
                            aux_loss=self.vae_weight * vae_loss.mean())


@register_model("biofusion")
def build_biofusion(in_dim: int, n_outputs: int = 1, hidden: int = 128, dropout: float = 0.25,
                    groups: list[list[int]] | None = None, genomic_dim: int = 16, clinical_dim: int = 0,
                    encoder_dims: list[int] | None = None, **_) -> BioFusionNet:
    return BioFusionNet(in_dim, encoder_dims, groups or default_groups(genomic_dim), clinical_dim, hidden,
                        dropout=dropout, n_outputs=n_outputs)
