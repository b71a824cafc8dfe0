"""A seed ensemble: several copies of one model, each trained with its own seed and its own inner
early-stopping split of the same training fold, read as one model.

At small n a single network's test C moves by a few hundredths with its seed and with which fifth of
the training fold decided early stopping; averaging members removes most of that variance, and
together the members have early-stopped on every training patient. A Cox risk is only defined up to a
shift and a scale, so each member's risk is first standardised by the mean and sd of its own risks on
the fold's training patients (fitted on the training fold, stored as buffers), then averaged. Every
other output (attention over tiles, genomic group attention, class or hazard logits) is the members'
mean, so reports, explanations and scoring read an ensemble exactly as they read one model.
"""

from __future__ import annotations

import torch
from torch import nn


class SeedEnsemble(nn.Module):
    def __init__(self, members: list[nn.Module]):
        super().__init__()
        if not members:
            raise ValueError("a seed ensemble needs at least one member")
        self.members = nn.ModuleList(members)
        self.register_buffer("risk_mean", torch.zeros(len(members)))
        self.register_buffer("risk_std", torch.ones(len(members)))

    def set_risk_scale(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Each member's training-fold risk mean and sd: its risk is read as (risk - mean) / sd."""
        self.risk_mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        self.risk_std.copy_(torch.as_tensor(std, dtype=torch.float32).clamp_min(1e-6))

    def forward(self, *args, **kwargs) -> dict:
        outs = [member(*args, **kwargs) for member in self.members]
        merged = {}
        for key, first in outs[0].items():
            if not isinstance(first, torch.Tensor) or any(o.get(key) is None or o[key].shape != first.shape
                                                          for o in outs):
                continue  # an output the members do not share in shape is not averaged into nonsense
            stacked = torch.stack([o[key].float() for o in outs])
            if key in ("risk", "branch_risk"):
                shape = (-1,) + (1,) * (stacked.dim() - 1)
                stacked = (stacked - self.risk_mean.view(shape)) / self.risk_std.view(shape)
            merged[key] = stacked.mean(0)
        return merged
