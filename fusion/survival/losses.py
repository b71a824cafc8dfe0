"""Survival losses. Convention everywhere: a higher risk score means worse survival."""

from __future__ import annotations

import torch


def cox_loss(risk: torch.Tensor, time: torch.Tensor, event: torch.Tensor,
             weight: torch.Tensor | None = None) -> torch.Tensor:
    """Negative Cox partial log-likelihood with Breslow's handling of tied times.

        L = -1/sum(w_i d_i) * sum_i w_i d_i [ r_i - log sum_{j: t_j >= t_i} exp(r_j) ]

    Risk sets are ordered by *time* (descending), so a subject's risk set is everyone still at
    risk at its event time; tied times share one risk set (Breslow).

    Args:
        risk: [B] predicted log-hazard.
        time: [B] follow-up time.
        event: [B] 1 if the event was observed, 0 if censored.
        weight: optional [B] per-sample weights (e.g. to rebalance rare events).
    Returns:
        scalar loss; 0 (with a gradient path) when the batch holds no event.
    """
    risk = risk.reshape(-1).float()
    time = time.reshape(-1).float()
    event = event.reshape(-1).float()
    w = torch.ones_like(risk) if weight is None else weight.reshape(-1).float()
    order = torch.argsort(time, descending=True, stable=True)
    risk, time, event, w = risk[order], time[order], event[order], w[order]
    log_cum = torch.logcumsumexp(risk, 0)
    # With ties, every member of a tie group uses the risk set up to the group's last member.
    _, inverse, counts = torch.unique_consecutive(time, return_inverse=True, return_counts=True)
    last = torch.cumsum(counts, 0) - 1
    log_risk_set = log_cum[last[inverse]]
    dw = event * w
    n = dw.sum()
    if n <= 0:
        return risk.sum() * 0.0
    return -((risk - log_risk_set) * dw).sum() / n
