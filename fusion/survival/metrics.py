"""Survival metrics, computed by scikit-survival (never re-implemented here)."""

from __future__ import annotations

import numpy as np
from sksurv.metrics import concordance_index_censored


def concordance(time: np.ndarray, event: np.ndarray, risk: np.ndarray) -> float:
    """Harrell's C-index (higher risk = earlier event); NaN when no pair is comparable."""
    event = np.asarray(event).astype(bool)
    if event.sum() == 0:
        return float("nan")
    try:
        return float(concordance_index_censored(event, np.asarray(time, float), np.asarray(risk, float))[0])
    except ValueError:  # no comparable pairs
        return float("nan")
