"""Statistics of out-of-fold predictions that never mix the scales of different fold models.

Each fold model's risk has its own offset and scale (a Cox risk is identified only up to a
constant, and every fold is a different network), so out-of-fold risks are never pooled raw:

- per-fold statistics are computed inside each test fold and averaged; their 95% interval comes
  from a bootstrap that resamples patients within each test fold (`fold_bootstrap`), the fold
  models held fixed;
- pooled statistics are computed on a common scale fitted on each fold's training patients only:
  a test patient's percentile among the risks that its fold model gave its own training patients
  (`common_scale`). Any increasing transform of one fold's risks (an offset, a scale) leaves
  every statistic unchanged.

The headline C-index of the project is the fold-mean Harrell C: it is what every fold model
achieves on patients it never saw, it needs no cross-fold scale at all, and it is what published
MIL survival models report; the pooled C on the common scale is printed beside it as a check.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from fusion.storage import read_json, read_parquet
from fusion.survival.horizons import common_horizons, surv_column
from fusion.survival.metrics import concordance, concordance_resampled

# Beyond the range of a fold's training risks the percentile saturates at 0 or 100; patients there
# are still ordered among themselves by their distance from the training median in IQR units,
# through a term too small to reorder anyone inside the range.
_TAIL = 1e-6


@dataclass
class OutOfFold:
    """One model's out-of-fold predictions and what each fold fitted on its training patients."""

    model: str
    preds: pd.DataFrame  # patient_id, fold, time, event, risk (or prob_*), surv_<h> columns
    cutoffs: dict[int, dict] = field(default_factory=dict)  # fold -> train_risk_cutoffs
    horizons: dict[int, list[float]] = field(default_factory=dict)  # fold -> horizons it chose
    fold_table: str | None = None  # fingerprint of the run's fold table the model was trained on
    task: str = "survival"

    @property
    def folds(self) -> list[int]:
        return sorted(int(f) for f in self.preds["fold"].unique())

    @property
    def has_cutoffs(self) -> bool:
        return all("percentiles" in self.cutoffs.get(f, {}) for f in self.folds)

    @property
    def common_horizons(self) -> list[float]:
        """Horizons chosen by every fold (each from its own training patients)."""
        if not self.horizons:
            return []
        return common_horizons([self.horizons.get(f, []) for f in self.folds])


def load_out_of_fold(model_dir: str | Path) -> OutOfFold:
    """Read `model_dir/predictions.parquet` with each fold's stored cutoffs and horizons."""
    model_dir = Path(model_dir)
    preds = read_parquet(model_dir / "predictions.parquet")
    cutoffs, horizons = {}, {}
    for fold in sorted(int(f) for f in preds["fold"].unique()):
        path = model_dir / f"fold-{fold}" / "metrics.json"
        metrics = read_json(path) if path.exists() else {}
        if metrics.get("train_risk_cutoffs"):
            cutoffs[fold] = metrics["train_risk_cutoffs"]
        if metrics.get("horizons") is not None:
            horizons[fold] = [float(h) for h in metrics["horizons"]]
    cv_path = model_dir / "cv_metrics.json"
    cv = read_json(cv_path) if cv_path.exists() else {}
    table = (cv.get("fold_table") or {}).get("fingerprint")
    task = "survival" if "risk" in preds.columns else "classification"
    return OutOfFold(model_dir.name, preds, cutoffs, horizons, table, task)


def percentile_of(risk, percentiles: list[float]) -> np.ndarray:
    """Percentile (0-100) of `risk` among a training fold's risks, from its stored 101 percentiles."""
    grid = np.asarray(percentiles, float)
    return np.interp(np.asarray(risk, float), grid, np.arange(len(grid), dtype=float))


def training_percentile(oof: OutOfFold) -> np.ndarray:
    """Each patient's percentile (0-100) among the risks its fold model gave its own training patients."""
    out = np.full(len(oof.preds), np.nan)
    risk = oof.preds["risk"].to_numpy(float)
    for fold, idx in oof.preds.groupby("fold").indices.items():
        out[idx] = percentile_of(risk[idx], oof.cutoffs[int(fold)]["percentiles"])
    return out


def common_scale(oof: OutOfFold) -> np.ndarray:
    """The pooled scale: training-fold percentile, ties beyond the training range broken in IQR units."""
    score = training_percentile(oof)
    risk = oof.preds["risk"].to_numpy(float)
    for fold, idx in oof.preds.groupby("fold").indices.items():
        p = np.asarray(oof.cutoffs[int(fold)]["percentiles"], float)
        iqr = max(p[75] - p[25], 1e-12)
        score[idx] += _TAIL * np.tanh((risk[idx] - p[50]) / iqr)
    return score


def per_fold(oof: OutOfFold, stat: Callable[[pd.DataFrame], float]) -> dict[int, float]:
    """`stat(test fold's predictions)` for every fold."""
    return {int(f): float(stat(p)) for f, p in oof.preds.groupby("fold")}


def harrell_per_fold(preds: pd.DataFrame, risk_col: str = "risk") -> dict[int, float]:
    return {int(f): concordance(p["time"], p["event"], p[risk_col]) for f, p in preds.groupby("fold")}


PAIR_MATRIX_MAX = 4000  # patients per fold up to which `stat_many` may hold a patient-pair matrix


def fold_bootstrap(preds: pd.DataFrame, stat: Callable[[dict], float], n_boot: int = 1000,
                   seed: int = 0, level: float = 0.95,
                   stat_many: Callable[[dict, np.ndarray], np.ndarray] | None = None) -> tuple[float, float]:
    """Percentile interval of the mean over folds of `stat(fold predictions)`, resampling patients
    with replacement within each test fold (fold models fixed: the uncertainty of their scores).
    `stat_many(fold columns, picks [B, m])`, when given, computes `stat` of every resample of a fold at
    once (same resamples, same result, faster)."""
    rng = np.random.default_rng(seed)
    # column arrays per fold: `stat` reads p["time"] etc. the same way from a frame or a dict
    groups = [{c: g[c].to_numpy() for c in g.columns} for _, g in preds.groupby("fold")]
    sizes = [len(g["fold"]) for g in groups]
    picks = [np.empty((n_boot, n), np.int64) for n in sizes]
    for b in range(n_boot):  # drawn in the order of resample, then fold, whichever way `stat` is computed
        for k, n in enumerate(sizes):
            picks[k][b] = rng.integers(0, n, n)
    if stat_many is not None and max(sizes) <= PAIR_MATRIX_MAX:
        stats = np.column_stack([stat_many(g, p) for g, p in zip(groups, picks, strict=True)])
    else:
        stats = np.array([[stat({c: v[p[b]] for c, v in g.items()}) for g, p in zip(groups, picks, strict=True)]
                          for b in range(n_boot)], float).reshape(n_boot, len(groups))
    finite = np.isfinite(stats).any(axis=1)
    values = np.full(n_boot, np.nan)
    with np.errstate(invalid="ignore"):
        values[finite] = np.nanmean(stats[finite], axis=1)
    values = values[np.isfinite(values)]
    if not len(values):
        return float("nan"), float("nan")
    alpha = (1 - level) / 2
    return float(np.quantile(values, alpha)), float(np.quantile(values, 1 - alpha))


def _harrell_many(g: dict, picks: np.ndarray) -> np.ndarray:
    return concordance_resampled(g["time"], g["event"], g["risk"], picks)


def _harrell(p) -> float:
    return concordance(p["time"], p["event"], p["risk"])


def fold_mean_c(oof: OutOfFold, n_boot: int = 1000, seed: int = 0) -> dict:
    """Harrell's C per test fold, their mean and sd, and the within-fold bootstrap 95% interval."""
    folds = harrell_per_fold(oof.preds)
    values = np.array(list(folds.values()), float)
    low, high = (fold_bootstrap(oof.preds, _harrell, n_boot, seed, stat_many=_harrell_many) if n_boot
                 else (float("nan"),) * 2)
    return {"c_index_mean": float(np.nanmean(values)), "c_index_sd": float(np.nanstd(values, ddof=1)),
            "c_index_ci": [low, high], "c_index_folds": [folds[f] for f in sorted(folds)]}


def pooled_c(oof: OutOfFold) -> float:
    """Harrell's C of all out-of-fold patients on the common scale (NaN without stored cutoffs)."""
    if oof.task != "survival" or not oof.has_cutoffs:
        return float("nan")
    return concordance(oof.preds["time"], oof.preds["event"], common_scale(oof))


def oracle_per_fold(oof: OutOfFold, truth: pd.Series) -> dict[int, float]:
    """Harrell's C of the true risk on the same test folds (synthetic cohorts)."""
    p = oof.preds.assign(true_risk=truth.reindex(oof.preds["patient_id"]).to_numpy(float))
    return harrell_per_fold(p, "true_risk")


def fraction_of_oracle(c: float, c_oracle: float) -> float:
    """Chance-corrected share of the oracle's discrimination: (C - 0.5) / (C_oracle - 0.5)."""
    return (c - 0.5) / (c_oracle - 0.5) if c_oracle > 0.5 else float("nan")


def paired_difference(best: OutOfFold, other: OutOfFold, n_boot: int = 1000, seed: int = 0) -> dict:
    """C(best) - C(other) on the patients both models scored, fold by fold (same fold table), with a
    paired bootstrap interval of the difference in fold-mean C (patients resampled within folds,
    the same resample for both models)."""
    a = best.preds[["patient_id", "fold", "time", "event", "risk"]]
    b = other.preds[["patient_id", "fold", "risk"]].rename(columns={"risk": "risk_other", "fold": "fold_other"})
    both = a.merge(b, on="patient_id")
    if (both["fold"] != both["fold_other"]).any():
        raise ValueError(f"{best.model} and {other.model} put some patients in different folds: "
                         "they were not trained on the same fold table")

    def diff(p) -> float:
        return concordance(p["time"], p["event"], p["risk"]) - concordance(p["time"], p["event"], p["risk_other"])

    def diff_many(g: dict, picks: np.ndarray) -> np.ndarray:
        return (concordance_resampled(g["time"], g["event"], g["risk"], picks)
                - concordance_resampled(g["time"], g["event"], g["risk_other"], picks))

    folds = {int(f): diff(p) for f, p in both.groupby("fold")}
    values = np.array(list(folds.values()), float)
    low, high = fold_bootstrap(both, diff, n_boot, seed, stat_many=diff_many) if n_boot else (float("nan"),) * 2
    return {"model": other.model, "versus": best.model, "n_patients": int(len(both)),
            "diff_folds": [folds[f] for f in sorted(folds)], "diff_mean": float(np.nanmean(values)),
            "diff_sd": float(np.nanstd(values, ddof=1)), "diff_ci": [low, high]}


def surv_matrix(oof: OutOfFold, horizons: list[float]) -> np.ndarray:
    """Predicted S(t) [P, T] at `horizons` (each fold's own model and baseline)."""
    return oof.preds[[surv_column(h) for h in horizons]].to_numpy(float)


__all__ = ["OutOfFold", "load_out_of_fold", "percentile_of", "training_percentile", "common_scale",
           "fold_bootstrap", "fold_mean_c", "pooled_c", "oracle_per_fold", "fraction_of_oracle",
           "paired_difference", "harrell_per_fold", "surv_matrix"]
