"""Survival losses (torch) and metrics (scikit-survival / lifelines)."""

from fusion.survival.losses import cox_loss
from fusion.survival.metrics import concordance

__all__ = ["cox_loss", "concordance"]
