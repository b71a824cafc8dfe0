"""A seed ensemble: several copies of one model, each trained with its own seed and its own inner
early-stopping split of the same training fold, read as one model.

At small n a single network's test C moves by a few hundredths with its seed and with which fifth of
the training fold decided early stopping; averaging members removes most of that variance, and
together the members have early-stopped on every training patient. A Cox risk is only defined up to a
shift and a scale, so each member's risk is first standardised by the mean and sd of its own risks on
the fold's training patients (fitted on the training fold, stored as buffers), then averaged, and the
average is put back on the members' mean scale (times their mean sd, plus their mean mean): the risk
stays a log hazard ratio in the units the members learned, so the Breslow baseline fitted on it gives
survival curves as spread as a single network's (slightly less: averaging shrinks), not as spread as a
unit-variance score. A member whose training risks are constant (a collapsed network: sd below 1e-3 of
the largest member's) is left out of the risk rather than having its noise blown up by a tiny sd.
Every other output (attention over tiles, genomic group attention, class or hazard logits) is the
members' mean, so reports, explanations and scoring read an ensemble exactly as they read one model.

Checkpoints of the first version (before the scale was kept) say so by lacking
`ensemble_risk_scale: "members"` in their config and are read as they were trained: the unit-variance
average, which their stored baseline was fitted on.
"""

from __future__ import annotations

import torch
from torch import nn

RISK_SCALES = ("members", "unit")  # "unit": the first version's unit-variance average (old checkpoints)
COLLAPSED = 1e-3  # a member whose training-risk sd is below this fraction of the largest is left out of the risk


class SeedEnsemble(nn.Module):
    def __init__(self, members: list[nn.Module], risk_scale: str = "members"):
        super().__init__()
        if not members:
            raise ValueError("a seed ensemble needs at least one member")
        if risk_scale not in RISK_SCALES:
            raise ValueError(f"risk_scale must be one of {RISK_SCALES}, got {risk_scale!r}")
        self.risk_scale = risk_scale
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
                merged[key] = self._combine_risks(stacked)
            else:
                merged[key] = stacked.mean(0)
        return merged

    def _combine_risks(self, stacked: torch.Tensor) -> torch.Tensor:
        """Members' risks [M, ...] -> one risk [...]: standardised, averaged, back on the members' scale."""
        shape = (-1,) + (1,) * (stacked.dim() - 1)
        z = (stacked - self.risk_mean.view(shape)) / self.risk_std.view(shape)
        if self.risk_scale == "unit":
            return z.mean(0)
        weight = (self.risk_std >= COLLAPSED * self.risk_std.max()).float()
        weight = weight / weight.sum()
        average = (z * weight.view(shape)).sum(0)
        return average * (self.risk_std * weight).sum() + (self.risk_mean * weight).sum()
