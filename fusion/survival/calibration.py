"""Absolute risk by a horizon, recalibrated on honest scores, with a bootstrap interval.

A fold model's risk is a relative score (a Cox log-hazard on that model's own scale, in-sample on
its training patients). To state "the probability of the event by 5 years" we recalibrate on
scores that no model trained on: each patient's out-of-fold score on the common training-fold
percentile scale (`fusion.survival.crossval`), turned into a normal score z = Phi^-1(percentile),
and a Cox model of the outcome on z (lifelines): risk(t | z) = 1 - S0(t) ** exp(gamma z).

Cross-fitting keeps every patient's own outcome out of its own absolute risk: the absolute risk of
a patient tested in fold k comes from the recalibration fitted on the patients of the other folds
(the training patients of fold k, with their honest scores); a new patient's from all of them.
The 95% interval resamples the recalibration patients (refitting gamma and the baseline hazard
each time) and, for a new patient scored by every fold model, which fold model's score is used:
it covers the calibration slope, the baseline hazard and the spread between fold models, not the
retraining of a network.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.stats import norm

from fusion.survival.crossval import OutOfFold, training_percentile

ALL = -1  # the recalibration on every out-of-fold patient (for new patients)


def normal_score(percentile) -> np.ndarray:
    """Phi^-1 of a training-fold percentile (0-100), clipped to the 0.5th-99.5th percentiles."""
    return norm.ppf(np.clip(np.asarray(percentile, float) / 100, 0.005, 0.995))


@dataclass
class Recalibration:
    """gamma and baseline survival at `horizons`, point estimate and bootstrap draws, per fold."""

    horizons: list[float]
    gamma: dict[int, float] = field(default_factory=dict)
    s0: dict[int, np.ndarray] = field(default_factory=dict)  # [T]
    gamma_boot: dict[int, np.ndarray] = field(default_factory=dict)  # [B]
    s0_boot: dict[int, np.ndarray] = field(default_factory=dict)  # [B, T]
    n: dict[int, int] = field(default_factory=dict)
    events: dict[int, int] = field(default_factory=dict)

    def absolute_risk(self, z: np.ndarray, fold: int = ALL) -> np.ndarray:
        """P(event by each horizon) [P, T] for normal scores `z`, by the recalibration of `fold`."""
        z = np.atleast_1d(np.asarray(z, float))
        return 1 - self.s0[fold][None, :] ** np.exp(self.gamma[fold] * z)[:, None]

    def interval(self, z_draws: np.ndarray, fold: int = ALL, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
        """Percentile interval [T] of the absolute risk over the bootstrap draws; `z_draws` [B] (or a
        scalar) is the patient's normal score in each draw (it varies when fold models are resampled)."""
        g, s0 = self.gamma_boot[fold], self.s0_boot[fold]
        z = np.broadcast_to(np.asarray(z_draws, float), g.shape)
        risk = 1 - s0 ** np.exp(g * z)[:, None]
        alpha = (1 - level) / 2
        return np.quantile(risk, alpha, axis=0), np.quantile(risk, 1 - alpha, axis=0)

    def state(self) -> dict:
        def listed(d):
            return {str(k): np.asarray(v).tolist() for k, v in d.items()}

        return {"horizons": self.horizons, "gamma": {str(k): v for k, v in self.gamma.items()},
                "s0": listed(self.s0), "gamma_boot": listed(self.gamma_boot), "s0_boot": listed(self.s0_boot),
                "n": {str(k): v for k, v in self.n.items()}, "events": {str(k): v for k, v in self.events.items()}}

    @classmethod
    def from_state(cls, state: dict) -> Recalibration:
        def arrays(d):
            return {int(k): np.asarray(v, float) for k, v in d.items()}

        def ints(d):
            return {int(k): int(v) for k, v in d.items()}

        return cls([float(h) for h in state["horizons"]], {int(k): float(v) for k, v in state["gamma"].items()},
                   arrays(state["s0"]), arrays(state["gamma_boot"]), arrays(state["s0_boot"]),
                   ints(state["n"]), ints(state["events"]))


def weighted_cox_1d(time: np.ndarray, event: np.ndarray, z: np.ndarray, weights: np.ndarray,
                    horizons: list[float], iterations: int = 25) -> tuple[np.ndarray, np.ndarray]:
    """Cox models of the outcome on one covariate for B weight vectors at once (Breslow ties).

    weights [B, P] (bootstrap counts; ones for the plain fit). Newton's method on the partial
    likelihood, risk-set sums by cumulative sums over time. Returns gamma [B] and the Breslow
    baseline survival at z = 0 at `horizons` [B, T]. The same estimates as scikit-survival's
    CoxPHSurvivalAnalysis(ties="breslow") with its BreslowEstimator (tests/test_calibration.py);
    written out here because a bootstrap refits it 200 times per fold.
    """
    order = np.argsort(-time, kind="stable")  # descending time: a risk set is a prefix
    t, d, x = time[order], event[order].astype(float), z[order]
    w = np.atleast_2d(weights)[:, order].astype(float)
    _, first = np.unique(-t, return_index=True)  # start of each tie group (in descending order)
    last = np.r_[first[1:], len(t)] - 1
    group_end = np.repeat(last, np.diff(np.r_[first, len(t)]))  # risk set of each subject ends at its group's end
    gamma = np.zeros(w.shape[0])
    for _ in range(iterations):
        e = w * np.exp(gamma[:, None] * x[None])
        s0 = np.maximum(np.cumsum(e, 1)[:, group_end], 1e-300)  # 0 only where the weight is 0 too
        s1 = np.cumsum(e * x, 1)[:, group_end]
        s2 = np.cumsum(e * x * x, 1)[:, group_end]
        wd = w * d
        score = (wd * (x - s1 / s0)).sum(1)
        info = (wd * (s2 / s0 - (s1 / s0) ** 2)).sum(1)
        step = score / np.maximum(info, 1e-12)
        gamma = gamma + np.clip(step, -2, 2)
        if np.abs(step).max() < 1e-10:
            break
    e = w * np.exp(gamma[:, None] * x[None])
    s0 = np.maximum(np.cumsum(e, 1)[:, group_end], 1e-300)
    # Breslow: dH0 at each event = (weighted events of its tie group) / risk-set sum, counted once per subject
    increments = (w * d) / s0
    ascending = np.argsort(t, kind="stable")
    t_up, cum = t[ascending], np.cumsum(increments[:, ascending], 1)
    idx = np.searchsorted(t_up, np.asarray(horizons, float), side="right") - 1
    hazard = np.where(idx >= 0, cum[:, np.clip(idx, 0, None)], 0.0)
    return gamma, np.exp(-hazard)


def fit_recalibration(oof: OutOfFold, horizons: list[float], n_boot: int = 200, seed: int = 0) -> Recalibration:
    """Cross-fitted recalibrations (one per fold, fitted on the other folds' patients) and one on all."""
    preds = oof.preds
    z = normal_score(training_percentile(oof))
    time, event = preds["time"].to_numpy(float), preds["event"].to_numpy(int)
    fold = preds["fold"].to_numpy(int)
    rng = np.random.default_rng(seed)
    out = Recalibration(list(horizons))
    for k in [ALL, *oof.folds]:
        rows = np.flatnonzero(fold != k) if k != ALL else np.arange(len(preds))
        out.n[k], out.events[k] = len(rows), int(event[rows].sum())
        counts = np.vstack([np.ones(len(rows)), rng.multinomial(len(rows), np.full(len(rows), 1 / len(rows)), n_boot)])
        gamma, s0 = weighted_cox_1d(time[rows], event[rows], z[rows], counts, horizons)
        out.gamma[k], out.s0[k] = float(gamma[0]), s0[0]
        out.gamma_boot[k], out.s0_boot[k] = gamma[1:], s0[1:]
    return out


def cross_fitted_risk(oof: OutOfFold, recal: Recalibration) -> np.ndarray:
    """Every out-of-fold patient's absolute risk at the horizons [P, T], each from the recalibration
    that did not see the patient."""
    z = normal_score(training_percentile(oof))
    out = np.zeros((len(z), len(recal.horizons)))
    for k, idx in oof.preds.groupby("fold").indices.items():
        out[idx] = recal.absolute_risk(z[idx], int(k))
    return out


__all__ = ["Recalibration", "fit_recalibration", "cross_fitted_risk", "normal_score", "ALL"]
