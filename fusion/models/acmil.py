"""`acmil`: Attention-Challenging MIL (Zhang et al., ECCV 2024).

M gated-attention branches look at the same tile embeddings. In training, among each branch's K
most attended tiles, a random `mask_ratio` share (int(K * ratio) tiles) is masked (stochastic top-K
instance masking, STKIM): their attention goes to the other tiles, which forces the model to find
evidence beyond a few salient tiles. A diversity loss (mean pairwise cosine similarity of the
branches' attention maps) keeps the branches apart. Each branch has its own head, trained on the
same target; the bag prediction is the bag head applied to the embedding pooled with the branches'
mean attention.

Defaults are the paper's (docs/acmil.md cites where each comes from): M = 5 branches, top-K = 10,
mask ratio 0.6, diversity weight 1 (the loss is the sum of the bag, mean branch and diversity
losses); attention width 128. Each is a model option (`branches`, `top_k`, `mask_ratio`, `diversity`).

    h = MLP(x)                          [B, N, H]
    a_m = softmax(gated_m(h))           [B, M, N]   (STKIM in training)
    z_m = a_m h,  z = mean_m(a_m) h     [B, M, H], [B, H]
    out = head(z);  aux = mean_m loss(head_m(z_m)) (by the trainer) + lambda * diversity(a)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fusion.models.base import TileModel
from fusion.models.registry import register_model


class ACMIL(TileModel):
    def __init__(self, in_dim: int, hidden: int = 128, attn_dim: int = 128, branches: int = 5, top_k: int = 10,
                 mask_ratio: float = 0.6, diversity: float = 1.0, dropout: float = 0.25, n_outputs: int = 1):
        super().__init__(in_dim, n_outputs)
        if branches < 1 or top_k < 0 or not 0 <= mask_ratio <= 1 or diversity < 0:
            raise ValueError(f"acmil: need branches >= 1, top_k >= 0, 0 <= mask_ratio <= 1, diversity >= 0; got "
                             f"branches={branches}, top_k={top_k}, mask_ratio={mask_ratio}, diversity={diversity}")
        self.embed = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.v = nn.Linear(hidden, attn_dim)
        self.u = nn.Linear(hidden, attn_dim)
        self.w = nn.Linear(attn_dim, branches)  # one attention vector per branch
        self.branch_heads = nn.ModuleList(nn.Linear(hidden, n_outputs) for _ in range(branches))
        self.head = nn.Linear(hidden, n_outputs)
        self.top_k, self.mask_ratio, self.diversity = top_k, mask_ratio, diversity

    def forward(self, features: torch.Tensor, mask: torch.Tensor, **_) -> dict:
        """features [B, N, D], mask [B, N] -> risk [B] | logits [B, C], attention [B, N], branch outputs."""
        h = self.embed(self.normalise(features))
        logits = self.w(torch.tanh(self.v(h)) * torch.sigmoid(self.u(h))).transpose(1, 2).float()  # [B, M, N]
        valid = mask[:, None, :].expand_as(logits)
        if self.training and self.top_k > 0 and self.mask_ratio > 0:
            valid = valid & ~self._stochastic_top_k(logits.detach(), valid)
        attn = torch.nan_to_num(torch.softmax(logits.masked_fill(~valid, float("-inf")), dim=-1), nan=0.0)
        z_branch = torch.einsum("bmn,bnh->bmh", attn.to(h.dtype), h)
        mean_attn = attn.mean(1)
        z = torch.einsum("bn,bnh->bh", mean_attn.to(h.dtype), h)
        branch_out = torch.stack([head(z_branch[:, m]) for m, head in enumerate(self.branch_heads)], 1).float()
        result = self.outputs(self.head(z), attention=mean_attn, embedding=z, branch_outputs=branch_out,
                              aux_loss=self.diversity * self._diversity(attn, mask))
        if self.n_outputs == 1:
            result["branch_risk"] = branch_out.squeeze(-1)  # [B, M]
        return result

    def _stochastic_top_k(self, logits: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Boolean [B, M, N]: the tiles masked in each branch, int(K * mask_ratio) of its top K,
        chosen uniformly at random (as the authors' code does)."""
        k = min(self.top_k, logits.shape[-1])
        n_drop = int(k * self.mask_ratio)
        drop = torch.zeros_like(valid)
        if n_drop == 0:
            return drop
        top = logits.masked_fill(~valid, float("-inf")).topk(k, dim=-1).indices  # [B, M, K]
        pick = torch.rand(top.shape, device=logits.device).argsort(-1)[..., :n_drop]
        drop.scatter_(-1, torch.gather(top, -1, pick), True)
        drop &= valid
        keep_some = (valid & ~drop).any(-1, keepdim=True)  # never mask a bag empty
        return drop & keep_some

    @staticmethod
    def _diversity(attn: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean pairwise cosine similarity between branches' attention maps (0 = disjoint)."""
        m = attn.shape[1]
        if m < 2:
            return attn.sum() * 0
        a = F.normalize(attn * mask[:, None, :], dim=-1)
        sim = torch.einsum("bmn,bkn->bmk", a, a)
        off = ~torch.eye(m, dtype=torch.bool, device=attn.device)
        return sim[:, off].mean()


OPTIONS = ("branches", "top_k", "mask_ratio", "diversity", "attn_dim")


@register_model("acmil", options=OPTIONS)
def build_acmil(in_dim: int, n_outputs: int = 1, hidden: int = 128, dropout: float = 0.25, **kwargs) -> ACMIL:
    return ACMIL(in_dim, hidden=hidden, dropout=dropout, n_outputs=n_outputs,
                 **{k: v for k, v in kwargs.items() if k in OPTIONS})
