"""Cross-attention blocks: a full transformer block whose queries read another token set, and
CrossViT's CLS-token cross-attention (one query per side: linear in the other side's tokens)."""

from __future__ import annotations

import torch
from torch import nn


def feed_forward(dim: int, dropout: float, mult: int = 2) -> nn.Module:
    return nn.Sequential(nn.Linear(dim, mult * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(mult * dim, dim),
                         nn.Dropout(dropout))


class CrossAttentionBlock(nn.Module):
    """Pre-norm transformer block with cross-attention: x + MHA(LN x, LN ctx), then x + FFN(LN x).

    A learned null token is always among the keys, so a query whose context is empty (a patient
    without tiles, a bag of padding) attends to it instead of producing NaN.
    """

    def __init__(self, dim: int, heads: int = 4, dropout: float = 0.1):
        super().__init__()
        self.norm_q, self.norm_kv, self.norm_ff = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.null = nn.Parameter(torch.zeros(1, 1, dim))
        self.ff = feed_forward(dim, dropout)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, ctx_mask: torch.Tensor | None = None,
                need_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x [B, Q, D] queries, ctx [B, K, D] keys/values, ctx_mask [B, K] (True = real) ->
        (x' [B, Q, D], attention [B, Q, K] over the real context when `need_weights`)."""
        b = x.shape[0]
        kv = torch.cat([self.null.expand(b, -1, -1).to(ctx.dtype), self.norm_kv(ctx)], 1)
        keep = torch.ones(b, kv.shape[1], dtype=torch.bool, device=x.device)
        if ctx_mask is not None:
            keep[:, 1:] = ctx_mask
        out, weights = self.attn(self.norm_q(x), kv, kv, key_padding_mask=~keep, need_weights=need_weights)
        x = x + self.drop(out)
        x = x + self.ff(self.norm_ff(x))
        return x, None if weights is None else weights[..., 1:]


class CLSCrossAttention(nn.Module):
    """CrossViT fusion, one direction: a branch's CLS token is the only query over [its CLS; the
    other branch's tokens]; the result is added back to the CLS (pre-norm, residual). O(N)."""

    def __init__(self, dim: int, heads: int = 4, dropout: float = 0.1):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)

    def forward(self, cls: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """cls [B, D], tokens [B, N, D], mask [B, N] -> (cls' [B, D], attention over the tokens [B, N])."""
        b, n = tokens.shape[:2]
        kv = self.norm(torch.cat([cls[:, None], tokens], 1))
        keep = torch.ones(b, n + 1, dtype=torch.bool, device=cls.device)
        if mask is not None:
            keep[:, 1:] = mask
        out, weights = self.attn(kv[:, :1], kv, kv, key_padding_mask=~keep)
        return cls + out[:, 0], weights[:, 0, 1:]


class CLSFusion(nn.Module):
    """Two-way CrossViT fusion of two token sets through their CLS tokens, `layers` times.

    Each layer updates both CLS tokens from the previous ones (simultaneously): a's CLS reads b's
    tokens, b's CLS reads a's tokens. Cost O(N_a + N_b) per layer, never N_a x N_b.
    """

    def __init__(self, dim: int, heads: int = 4, layers: int = 1, dropout: float = 0.1):
        super().__init__()
        self.a_reads_b = nn.ModuleList(CLSCrossAttention(dim, heads, dropout) for _ in range(layers))
        self.b_reads_a = nn.ModuleList(CLSCrossAttention(dim, heads, dropout) for _ in range(layers))

    def forward(self, cls_a: torch.Tensor, tokens_a: torch.Tensor, mask_a: torch.Tensor | None,
                cls_b: torch.Tensor, tokens_b: torch.Tensor, mask_b: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (cls_a' [B, D], cls_b' [B, D], b's CLS attention over a's tokens in the last layer [B, N_a])."""
        attn_a = None
        for ab, ba in zip(self.a_reads_b, self.b_reads_a, strict=True):
            new_a, _ = ab(cls_a, tokens_b, mask_b)
            cls_b, attn_a = ba(cls_b, tokens_a, mask_a)
            cls_a = new_a
        return cls_a, cls_b, attn_a
