"""Survival losses. Convention everywhere: a higher risk score means worse survival.

Every loss a model can be trained with (`SURVIVAL_LOSSES`) is consistent: minimised with a linear
risk on a simulated proportional-hazards cohort it recovers the true log hazard ratio, as the
partial likelihood does (tests/test_survival.py checks each one). BioFusionNet's published weighted
Cox loss is kept only as `paper_weighted_cox_loss`, for the record of its bias (README, "Losses").
"""

from __future__ import annotations

import numpy as np
import torch


def _real(t: torch.Tensor) -> torch.Tensor:
    """Float32, or float64 when given float64 (reference checks); never bf16 (autocast outputs)."""
    return t.reshape(-1).double() if t.dtype == torch.float64 else t.reshape(-1).float()


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
        weight: optional [B] weights w of the event terms. The estimate stays consistent when they
            are fixed before the outcome is seen at that time (a function of time, baseline
            covariates or the sampling design), not when they depend on a patient's own future.
        risk_set_weight: optional [B] weights v inside the risk sets (1 when omitted); only sound
            when they are known at baseline (e.g. sampling weights), never the patient's event status.
    Returns:
        scalar loss; 0 (with a gradient path) when the batch holds no event.
    """
    risk = _real(risk)
    time, event = _real(time).to(risk.dtype), _real(event).to(risk.dtype)
    w = torch.ones_like(risk) if weight is None else _real(weight).to(risk.dtype)
    log_v = torch.zeros_like(risk) if risk_set_weight is None else torch.log(_real(risk_set_weight).to(risk.dtype))
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


def efron_cox_loss(risk: torch.Tensor, time: torch.Tensor, event: torch.Tensor,
                   weight: torch.Tensor | None = None) -> torch.Tensor:
    """Negative Cox partial log-likelihood with Efron's approximation for tied event times.

    For an event time with d tied events D and risk set R, the l-th tied event (l = 0..d-1) is
    compared with sum_R exp(r) - l/d * sum_D exp(r). Vectorised over all event times. `weight`
    (optional, [B]) weights the event terms as in `cox_loss`.
    """
    risk = _real(risk)
    time, event = _real(time).to(risk.dtype), _real(event).to(risk.dtype)
    if event.sum() <= 0:
        return risk.sum() * 0.0
    w = torch.ones_like(risk) if weight is None else _real(weight).to(risk.dtype)
    order = torch.argsort(time, descending=True, stable=True)
    risk, time, event, w = risk[order], time[order], event[order], w[order]
    shift = risk.max().detach()
    e = torch.exp(risk - shift)
    _, group, counts = torch.unique_consecutive(time, return_inverse=True, return_counts=True)
    last = torch.cumsum(counts, 0) - 1
    at_risk = torch.cumsum(e, 0)[last][group]  # sum of exp(risk) over each subject's risk set
    per_group = torch.zeros_like(counts, dtype=e.dtype)
    tied = per_group.index_add(0, group, e * event)[group]  # sum of exp(risk) over the tied events
    n_events = per_group.index_add(0, group, event)  # events per time
    before = (torch.cumsum(n_events, 0) - n_events)[group]  # events at earlier positions, other times
    rank = torch.cumsum(event, 0) - event - before  # l: events tied with this one that come first
    n_tied = n_events[group]
    denom = at_risk - rank / n_tied.clamp_min(1) * tied
    terms = (risk - shift - torch.log(denom.clamp_min(1e-30))) * event * w
    return -terms.sum() / (event * w).sum()


def ipcw_event_weights(time: np.ndarray, event: np.ndarray, floor: float = 0.05) -> np.ndarray:
    """1 / G(t_i): inverse probability of being still uncensored at each patient's time (G is the
    Kaplan-Meier estimate of the censoring distribution, scikit-survival), floored at `floor`, and
    scaled to mean 1 over the events. Censored patients get 0 (they carry no event term)."""
    from sksurv.nonparametric import kaplan_meier_estimator

    time, event = np.asarray(time, float), np.asarray(event).astype(bool)
    w = np.zeros(len(time))
    if not event.any():
        return w
    if event.all():
        w[:] = 1.0
        return w
    grid, g = kaplan_meier_estimator(event, time, reverse=True)
    idx = np.searchsorted(grid, time, side="right") - 1
    g_at = np.where(idx >= 0, g[np.clip(idx, 0, None)], 1.0)
    w[event] = 1.0 / np.maximum(g_at[event], floor)
    return w / w[event].mean()


def weighted_cox_loss(risk: torch.Tensor, time: torch.Tensor, event: torch.Tensor,
                      weight: torch.Tensor | None = None) -> torch.Tensor:
    """Censoring-weighted Cox loss: each event term weighted by 1/G(t), the inverse probability of
    remaining uncensored until its time (`ipcw_event_weights`), normalised over the events.

    BioFusionNet's aim is that rare events do not drown. In the partial likelihood only events
    have terms, so rebalancing events against censored patients can only act inside the risk
    sets, which weights patients by their own future and biases the hazard ratio (see
    `paper_weighted_cox_loss`). Events are rare where censoring has thinned the cohort; weighting
    each by 1/G(t) lets it stand for the patients censoring removed. The weight is a fixed function
    of time, so the estimate stays consistent. Pass `weight` fitted on the whole training fold
    (the trainer does); without it the batch's own censoring distribution is used.
    """
    if weight is None:
        weight = torch.as_tensor(ipcw_event_weights(time.detach().cpu().numpy().reshape(-1),
                                                    event.detach().cpu().numpy().reshape(-1)), device=risk.device)
    return cox_loss(risk, time, event, weight=weight)


def event_balance_weights(event: torch.Tensor) -> torch.Tensor:
    """Weights that give events and censored patients equal total mass (mean 1): BioFusionNet's."""
    event = event.reshape(-1).float()
    n, n_event = len(event), event.sum()
    if n_event == 0 or n_event == n:
        return torch.ones_like(event)
    w_event, w_censored = n / (2 * n_event), n / (2 * (n - n_event))
    return torch.where(event > 0, w_event, w_censored)


def paper_weighted_cox_loss(risk: torch.Tensor, time: torch.Tensor, event: torch.Tensor) -> torch.Tensor:
    """BioFusionNet's weighted Cox loss as described: event-rebalancing weights on the event terms
    and inside the risk sets. A patient's weight in a risk set depends on whether it *will* have an
    event, so the estimate is biased (about 30 % too small a hazard ratio at 16 % events). Not
    offered for training; kept to measure that bias."""
    w = event_balance_weights(event)
    return cox_loss(risk, time, event, weight=w, risk_set_weight=w)


def discrete_time_bins(time: torch.Tensor, event: torch.Tensor, n_bins: int = 4) -> torch.Tensor:
    """Bin edges [n_bins + 1] at quantiles of the *uncensored* times (MCAT); the outer edges are open."""
    t = time[event > 0] if (event > 0).sum() >= n_bins else time
    q = torch.quantile(t.float(), torch.linspace(0, 1, n_bins + 1, device=time.device))
    q[0], q[-1] = -float("inf"), float("inf")
    return q


def log_hazards(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log h_k, log(1 - h_k)) of discrete hazards with the complementary log-log link,
    h_k = 1 - exp(-exp(logit_k)): the grouped-time proportional hazards model (Prentice and
    Gloeckler 1978), so that a covariate's coefficient is the continuous-time log hazard ratio."""
    logits = logits.double() if logits.dtype == torch.float64 else logits.float()
    u = torch.exp(logits.clamp(max=30.0))
    return torch.log(-torch.expm1(-u.clamp_min(1e-30))), -u


def hazards_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Discrete-time hazards [B, K] in (0, 1) from the model's logits (complementary log-log link)."""
    return -torch.expm1(-torch.exp(logits.float().clamp(max=30.0)))


def nll_survival_loss(logits: torch.Tensor, time: torch.Tensor, event: torch.Tensor,
                      edges: torch.Tensor) -> torch.Tensor:
    """Discrete-time negative log-likelihood (MCAT's NLL, with the cloglog link of `log_hazards`).

    logits [B, K] -> hazards h_k, survival S_k = prod_{j<=k} (1 - h_j). An event in bin k
    contributes -log S_{k-1} - log h_k; a patient censored in bin k, -log S_k (as MCAT). MCAT's
    logistic link and its alpha (extra weight on uncensored patients) bias the hazard ratio: with
    the logistic link the coefficient came out ~5 % too large on the simulation of the tests.
    """
    y = torch.bucketize(time.float().contiguous(), edges[1:-1].float().contiguous(), right=True).long()  # [B]
    log_h, log_1mh = log_hazards(logits)
    time, event = time.to(log_h.dtype), event.to(log_h.dtype)
    log_surv = torch.cat([torch.zeros_like(log_1mh[:, :1]), torch.cumsum(log_1mh, 1)], 1)  # log S_{k-1}, k=0..K
    s_prev = log_surv.gather(1, y[:, None]).squeeze(1)
    s_y = log_surv.gather(1, (y + 1)[:, None]).squeeze(1)
    h_y = log_h.gather(1, y[:, None]).squeeze(1)
    return (-event * (s_prev + h_y) - (1 - event) * s_y).mean()


def risk_from_hazards(logits: torch.Tensor) -> torch.Tensor:
    """A scalar risk per patient from discrete-time logits: minus the sum of survival over bins (MCAT)."""
    return -torch.cumprod(1 - hazards_from_logits(logits), dim=1).sum(1)


# Losses on a Cox log-hazard that a model can be trained with (`TrainConfig.loss`); "nll" is the
# discrete-time alternative, on K logits instead of one risk.
SURVIVAL_LOSSES = {"cox": cox_loss, "efron": efron_cox_loss, "weighted_cox": weighted_cox_loss}
