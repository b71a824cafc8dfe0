"""Gated attention pooling (Ilse et al., 2018): the MIL readout every model shares."""

from __future__ import annotations

import torch
from torch import nn


class GatedAttentionPool(nn.Module):
    """a_n = w^T (tanh(V h_n) * sigmoid(U h_n)); softmax over the real tiles; z = sum_n a_n h_n."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.v = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Dropout(dropout))
        self.u = nn.Sequential(nn.Linear(dim, hidden), nn.Sigmoid(), nn.Dropout(dropout))
        self.w = nn.Linear(hidden, 1)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Attention logits [B, N] (float32)."""
        return self.w(self.v(h) * self.u(h)).squeeze(-1).float()

    def forward(self, h: torch.Tensor, mask: torch.Tensor, extra: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """h [B, N, D], mask [B, N] (True = real tile) -> pooled [B, D], attention [B, N].

        `extra` (tokens [B, M, D], mask [B, M]) joins the softmax (PWCA's distractor): the pooled
        vector then mixes both sets; the attention returned is over `h` only.
        """
        if extra is not None:
            h_all, m_all = torch.cat([h, extra[0]], 1), torch.cat([mask, extra[1]], 1)
            pooled, attn = self(h_all, m_all)
            return pooled, attn[:, : h.shape[1]]
        logits = self.logits(h).masked_fill(~mask, float("-inf"))
        attn = torch.nan_to_num(torch.softmax(logits, dim=1), nan=0.0)  # a bag with no tile: all zeros
        return torch.einsum("bn,bnd->bd", attn.to(h.dtype), h), attn
