"""Survival metrics, computed by scikit-survival. One exception: `concordance_resampled`, Harrell's C of
many bootstrap resamples at once (sksurv's definition, tied risks and times included, evaluated as a
weighted pair matrix), because one sksurv call per resample made a 1,000-resample comparison of 8 models
take a minute; `tests/test_survival.py` holds it equal to sksurv on resamples with ties."""

from __future__ import annotations

import numpy as np
from sksurv.metrics import concordance_index_censored

TIED_RISK = 1e-8  # sksurv's tied_tol


def concordance_resampled(time: np.ndarray, event: np.ndarray, risk: np.ndarray, picks: np.ndarray) -> np.ndarray:
    """Harrell's C of each resample: row b of `picks` [B, m] holds indices into the patients (drawn with
    replacement); the result [B] equals `concordance` on the picked patients (NaN without a comparable pair).

    sksurv's pairs: an event i is comparable with j when t_j > t_i, or t_j = t_i and j is censored; the
    pair scores 1 when risk_i > risk_j, 0.5 when the risks are within 1e-8. A resample repeats patients,
    so its sums are the pair matrix weighted by how often each patient was drawn."""
    time, risk = np.asarray(time, float), np.asarray(risk, float)
    event = np.asarray(event).astype(bool)
    later = (time[None, :] > time[:, None]) | ((time[None, :] == time[:, None]) & ~event[None, :])
    comparable = (event[:, None] & later).astype(float)
    gap = risk[:, None] - risk[None, :]
    score = np.where(np.abs(gap) <= TIED_RISK, 0.5, (gap > 0).astype(float)) * comparable
    picks = np.asarray(picks)
    counts = np.zeros((picks.shape[0], len(time)))
    np.add.at(counts, (np.arange(picks.shape[0])[:, None], picks), 1.0)
    den = ((counts @ comparable) * counts).sum(axis=1)
    num = ((counts @ score) * counts).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def concordance(time: np.ndarray, event: np.ndarray, risk: np.ndarray) -> float:
    """Harrell's C-index (higher risk = earlier event); NaN when no pair is comparable."""
    event = np.asarray(event).astype(bool)
    if event.sum() == 0:
        return float("nan")
    try:
        return float(concordance_index_censored(event, np.asarray(time, float), np.asarray(risk, float))[0])
    except ValueError:  # no comparable pairs
        return float("nan")
