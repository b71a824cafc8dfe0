"""Survival losses. Convention everywhere: a higher risk score means worse survival."""

from __future__ import annotations

import torch


def cox_loss(risk: torch.Tensor, time: torch.Tensor, event: torch.Tensor,
             weight: torch.Tensor | None = None, risk_set_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Negative Cox partial log-likelihood with Breslow's handling of tied times.

        L = -1/sum(w_i d_i) * sum_i w_i d_i [ r_i - log sum_{j: t_j >= t_i} v_j exp(r_j) ]

    Risk sets are ordered by *time* (descending), so a subject's risk set is everyone still at
    risk at its event time; tied times share one risk set (Breslow).

    Args:
        risk: [B] predicted log-hazard (higher = worse).
        time: [B] follow-up time.
        event: [B] 1 if the event was observed, 0 if censored.
        weight: optional [B] weights w of the event terms.
        risk_set_weight: optional [B] weights v inside the risk sets (1 when omitted).
    Returns:
        scalar loss; 0 (with a gradient path) when the batch holds no event.
    """
    risk = risk.reshape(-1).float()
    time = time.reshape(-1).float()
    event = event.reshape(-1).float()
    w = torch.ones_like(risk) if weight is None else weight.reshape(-1).float()
    log_v = torch.zeros_like(risk) if risk_set_weight is None else torch.log(risk_set_weight.reshape(-1).float())
    order = torch.argsort(time, descending=True, stable=True)
    risk, time, event, w, log_v = risk[order], time[order], event[order], w[order], log_v[order]
    log_cum = torch.logcumsumexp(risk + log_v, 0)
    # With ties, every member of a tie group uses the risk set up to the group's last member.
    _, inverse, counts = torch.unique_consecutive(time, return_inverse=True, return_counts=True)
    last = torch.cumsum(counts, 0) - 1
    log_risk_set = log_cum[last[inverse]]
    dw = event * w
    n = dw.sum()
    if n <= 0:
        return risk.sum() * 0.0
    return -((risk - log_risk_set) * dw).sum() / n


def event_balance_weights(event: torch.Tensor) -> torch.Tensor:
    """Per-sample weights that give events and censored patients equal total weight.

    With events a minority (ER+ cohorts: ~20-35 %), an unweighted Cox loss is dominated by the
    risk sets of few events; BioFusionNet's weighted Cox loss rebalances them. Mean weight is 1.
    """
    event = event.reshape(-1).float()
    n, n_event = len(event), event.sum()
    if n_event == 0 or n_event == n:
        return torch.ones_like(event)
    w_event, w_censored = n / (2 * n_event), n / (2 * (n - n_event))
    return torch.where(event > 0, w_event, w_censored)


def weighted_cox_loss(risk: torch.Tensor, time: torch.Tensor, event: torch.Tensor,
                      weight: torch.Tensor | None = None) -> torch.Tensor:
    """Weighted Cox partial likelihood: per-sample weights act on the event terms *and* inside
    the risk sets (`cox_loss` with w = v), risk sets ordered by time. BioFusionNet's public code
    ordered risk sets by predicted risk and used a constant weight, which cancels out; here the
    default weights (`event_balance_weights`) give events and censored patients equal mass.
    """
    w = event_balance_weights(event) if weight is None else weight
    return cox_loss(risk, time, event, weight=w, risk_set_weight=w)


def efron_cox_loss(risk: torch.Tensor, time: torch.Tensor, event: torch.Tensor) -> torch.Tensor:
    """Negative Cox partial log-likelihood with Efron's approximation for tied event times."""
    risk, time, event = risk.reshape(-1).float(), time.reshape(-1).float(), event.reshape(-1).float()
    n_events = event.sum()
    if n_events == 0:
        return risk.sum() * 0.0
    exp_r = torch.exp(risk - risk.max())
    shift = risk.max()
    total = risk.new_zeros(())
    for t in torch.unique(time[event > 0]):
        tied = (time == t) & (event > 0)
        d = tied.sum()
        at_risk = exp_r[time >= t].sum()
        tied_sum = exp_r[tied].sum()
        frac = torch.arange(d, device=risk.device, dtype=risk.dtype) / d
        total = total + risk[tied].sum() - torch.log(at_risk - frac * tied_sum).sum() - d * shift
    return -total / n_events


def discrete_time_bins(time: torch.Tensor, event: torch.Tensor, n_bins: int = 4) -> torch.Tensor:
    """Bin edges [n_bins + 1] at quantiles of the *uncensored* times (MCAT); the outer edges are open."""
    t = time[event > 0] if (event > 0).sum() >= n_bins else time
    q = torch.quantile(t.float(), torch.linspace(0, 1, n_bins + 1, device=time.device))
    q[0], q[-1] = -float("inf"), float("inf")
    return q


def nll_survival_loss(logits: torch.Tensor, time: torch.Tensor, event: torch.Tensor, edges: torch.Tensor,
                      alpha: float = 0.0) -> torch.Tensor:
    """Discrete-time negative log-likelihood (MCAT; Zadeh & Schmid 2020).

    logits [B, K] -> hazards h_k = sigmoid(logits_k), survival S_k = prod_{j<=k} (1 - h_j).
    An event in bin k contributes -log S_{k-1} - log h_k; a censored patient -log S_k.
    Loss = (1 - alpha) * (censored + uncensored) + alpha * uncensored, as in MCAT.
    """
    y = torch.bucketize(time.float().contiguous(), edges[1:-1].contiguous(), right=True).long()  # [B]
    hazards = torch.sigmoid(logits.float())
    surv = torch.cat([torch.ones_like(hazards[:, :1]), torch.cumprod(1 - hazards, dim=1)], dim=1)  # S_{-1} = 1
    eps = 1e-7
    s_prev = surv.gather(1, y[:, None]).squeeze(1).clamp_min(eps)
    s_y = surv.gather(1, (y + 1)[:, None]).squeeze(1).clamp_min(eps)
    h_y = hazards.gather(1, y[:, None]).squeeze(1).clamp_min(eps)
    e = event.float()
    uncensored = -e * (torch.log(s_prev) + torch.log(h_y))
    censored = -(1 - e) * torch.log(s_y)
    return ((1 - alpha) * (censored + uncensored) + alpha * uncensored).mean()


def risk_from_hazards(logits: torch.Tensor) -> torch.Tensor:
    """A scalar risk per patient from discrete hazards: minus the sum of survival over bins (MCAT)."""
    return -torch.cumprod(1 - torch.sigmoid(logits.float()), dim=1).sum(1)
