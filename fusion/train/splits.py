"""Patient-level cross-validation splits, stratified by event so each fold has events."""

from __future__ import annotations

import numpy as np
from sklearn.model_selection import StratifiedKFold, train_test_split


def cv_folds(event: np.ndarray, k: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """k (train_idx, test_idx) pairs over patients, stratified by event."""
    event = np.asarray(event).astype(int)
    n_minority = min(np.bincount(event, minlength=2))
    if k < 2 or k > len(event):
        raise ValueError(f"folds must be between 2 and the number of patients ({len(event)}), got {k}")
    if n_minority < k:
        raise ValueError(f"only {n_minority} patients in the rarer event class: too few for {k} folds")
    skf = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    return [(tr, te) for tr, te in skf.split(np.zeros(len(event)), event)]


def inner_split(event: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit_idx, val_idx) inside a training fold, stratified by event, for early stopping."""
    idx = np.arange(len(event))
    return train_test_split(idx, test_size=fraction, random_state=seed, stratify=np.asarray(event).astype(int))
