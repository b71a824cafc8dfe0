"""Survival losses (torch) and metrics (scikit-survival / lifelines)."""

from fusion.survival.losses import (
    cox_loss,
    discrete_time_bins,
    efron_cox_loss,
    event_balance_weights,
    nll_survival_loss,
    risk_from_hazards,
    weighted_cox_loss,
)
from fusion.survival.metrics import concordance

__all__ = ["cox_loss", "efron_cox_loss", "weighted_cox_loss", "event_balance_weights", "nll_survival_loss",
           "discrete_time_bins", "risk_from_hazards", "concordance"]
