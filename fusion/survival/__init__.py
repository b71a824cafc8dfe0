"""Survival losses (torch), horizons and metrics (scikit-survival / lifelines)."""

from fusion.survival.losses import (
    SURVIVAL_LOSSES,
    cox_loss,
    discrete_time_bins,
    efron_cox_loss,
    event_balance_weights,
    hazards_from_logits,
    ipcw_event_weights,
    nll_survival_loss,
    paper_weighted_cox_loss,
    risk_from_hazards,
    weighted_cox_loss,
)
from fusion.survival.metrics import concordance

__all__ = ["SURVIVAL_LOSSES", "cox_loss", "efron_cox_loss", "weighted_cox_loss", "paper_weighted_cox_loss",
           "event_balance_weights", "ipcw_event_weights", "nll_survival_loss", "hazards_from_logits",
           "discrete_time_bins", "risk_from_hazards", "concordance"]
