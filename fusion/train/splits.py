"""The inner split of a training fold for early stopping (the outer folds are the run's fold table,
`fusion.train.folds`)."""

from __future__ import annotations

import numpy as np
from sklearn.model_selection import train_test_split


def inner_split(event: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit_idx, val_idx) inside a training fold, stratified by event, for early stopping."""
    idx = np.arange(len(event))
    return train_test_split(idx, test_size=fraction, random_state=seed, stratify=np.asarray(event).astype(int))
