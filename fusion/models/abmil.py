"""`abmil`: gated attention multiple-instance learning (Ilse, Tomczak & Welling, ICML 2018).

    h_n = MLP(x_n)                                  tile embeddings          [B, N, H]
    a_n = w^T (tanh(V h_n) * sigmoid(U h_n))        attention logits          [B, N]
    alpha = softmax over the unmasked tiles         attention weights         [B, N]
    z = sum_n alpha_n h_n                           bag embedding             [B, H]
    risk = head(z)                                  log-hazard [B] or logits [B, C]

Cost is linear in the number of tiles. Input standardisation (mean/std fitted on the training
fold) lives in buffers, so a saved model carries it.
"""

from __future__ import annotations

import torch
from torch import nn

from fusion.models.base import TileModel
from fusion.models.blocks.pooling import GatedAttentionPool
from fusion.models.registry import register_model

__all__ = ["ABMIL", "GatedAttentionPool"]


class ABMIL(TileModel):
    def __init__(self, in_dim: int, hidden: int = 128, attn_dim: int = 64, dropout: float = 0.25,
                 n_outputs: int = 1):
        super().__init__(in_dim, n_outputs)
        self.embed = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.pool = GatedAttentionPool(hidden, attn_dim, dropout)
        self.head = nn.Sequential(nn.Linear(hidden, hidden // 2), nn.ReLU(), nn.Dropout(dropout),
                                  nn.Linear(hidden // 2, n_outputs))

    def forward(self, features: torch.Tensor, mask: torch.Tensor, **_: torch.Tensor) -> dict:
        """features [B, N, D], mask [B, N] -> {'risk' [B] | 'logits' [B, C], 'attention' [B, N]}."""
        h = self.embed(self.normalise(features))
        z, attn = self.pool(h, mask)
        return self.outputs(self.head(z), attention=attn, embedding=z)


@register_model("abmil")
def build_abmil(in_dim: int, n_outputs: int = 1, hidden: int = 128, dropout: float = 0.25, **_) -> ABMIL:
    return ABMIL(in_dim, hidden=hidden, dropout=dropout, n_outputs=n_outputs)
