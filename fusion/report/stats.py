"""Cohort statistics on out-of-fold predictions. Every number comes from scikit-survival, lifelines
or scikit-learn; this module only chooses what to compute and how to resample it.

Conventions: `risk` is higher for worse prognosis; survival times and events are the cohort's.
Risks given to these functions are on one scale (a single model's, or the common training-fold
percentile scale of `fusion.survival.crossval`): callers never pass raw risks of several fold models.
The censoring distribution for a pooled Uno's C, time-dependent AUC and the Brier score is estimated
on the whole cohort (every patient is a training patient of k-1 folds); per fold, on that fold's
training patients.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
import pandas as pd
from sksurv.util import Surv


def surv(time: np.ndarray, event: np.ndarray) -> np.ndarray:
    return Surv.from_arrays(np.asarray(event).astype(bool), np.asarray(time, float))


def uno_c(time, event, risk, tau: float | None = None, train_time=None, train_event=None) -> float:
    """Uno's IPCW C-index truncated at `tau` (default: the 90th percentile of follow-up); the censoring
    distribution from (`train_time`, `train_event`) when given, else from these patients."""
    from sksurv.metrics import concordance_index_ipcw

    y = surv(time, event)
    y_train = y if train_time is None else surv(train_time, train_event)
    tau = float(np.quantile(time, 0.9)) if tau is None else tau
    try:
        return float(concordance_index_ipcw(y_train, y, np.asarray(risk, float), tau=tau)[0])
    except ValueError:
        return float("nan")


def bootstrap_ci(stat: Callable[[np.ndarray], float], n: int, n_boot: int = 1000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of `stat(indices)` over patients resampled with replacement."""
    rng = np.random.default_rng(seed)
    values = np.array([stat(rng.integers(0, n, n)) for _ in range(n_boot)], float)
    values = values[np.isfinite(values)]
    if not len(values):
        return float("nan"), float("nan")
    alpha = (1 - level) / 2
    return float(np.quantile(values, alpha)), float(np.quantile(values, 1 - alpha))


def usable_times(time, event, candidates) -> list[float]:
    """Horizons inside the follow-up where time-dependent metrics are defined (after the first event,
    before the last observed time)."""
    time, event = np.asarray(time, float), np.asarray(event).astype(bool)
    if not event.any():
        return []
    lo, hi = time[event].min(), time.max()
    return [float(t) for t in candidates if lo <= t < hi]


def td_auc(time, event, risk, times) -> tuple[list[float], float]:
    """Cumulative/dynamic AUC at each horizon and its mean (scikit-survival)."""
    from sksurv.metrics import cumulative_dynamic_auc

    y = surv(time, event)
    auc, mean = cumulative_dynamic_auc(y, y, np.asarray(risk, float), times)
    return [float(a) for a in auc], float(mean)


def integrated_brier(time, event, survival: np.ndarray, times) -> float:
    """Integrated Brier score of predicted S(t) [P, T] at `times` (scikit-survival); lower is better."""
    from sksurv.metrics import integrated_brier_score

    y = surv(time, event)
    return float(integrated_brier_score(y, y, survival, times))


def calibration(time, event, survival_at_t: np.ndarray, horizon: float, bins: int = 3) -> pd.DataFrame:
    """Predicted against observed survival at `horizon`, patients binned by predicted S(horizon):
    mean prediction beside the Kaplan-Meier estimate (95% CI) of each bin."""
    from lifelines import KaplanMeierFitter

    pred = np.asarray(survival_at_t, float)
    edges = np.quantile(pred, np.linspace(0, 1, bins + 1))
    which = np.clip(np.searchsorted(edges[1:-1], pred, side="right"), 0, bins - 1)
    rows = []
    for b in range(bins):
        sel = which == b
        if sel.sum() < 2:
            continue
        km = KaplanMeierFitter().fit(np.asarray(time)[sel], np.asarray(event)[sel])
        ci = km.confidence_interval_survival_function_.loc[:horizon]
        low, high = ci.iloc[-1].to_numpy() if len(ci) else (1.0, 1.0)
        rows.append({"bin": b + 1, "n": int(sel.sum()), "predicted": float(pred[sel].mean()),
                     "observed": float(km.survival_function_at_times(horizon).iloc[0]),
                     "observed_low": float(low), "observed_high": float(high)})
    return pd.DataFrame(rows)


def risk_groups(percentile: np.ndarray, scheme: str = "median") -> np.ndarray:
    """Group names from each patient's percentile within its training fold's risks."""
    percentile = np.asarray(percentile, float)
    if scheme == "median":
        return np.where(percentile >= 50, "high", "low")
    if scheme == "tertiles":
        return np.select([percentile < 100 / 3, percentile < 200 / 3], ["low", "intermediate"], "high")
    raise ValueError(f"unknown risk-group scheme '{scheme}': use median or tertiles")


GROUP_ORDER = ["low", "intermediate", "high"]


def kaplan_meier(time, event, groups) -> dict:
    """Kaplan-Meier curve with its 95% band per group, and the log-rank test across groups (lifelines)."""
    from lifelines import KaplanMeierFitter
    from lifelines.statistics import multivariate_logrank_test

    time, event, groups = np.asarray(time, float), np.asarray(event).astype(int), np.asarray(groups)
    curves = {}
    for g in [g for g in GROUP_ORDER if g in set(groups)]:
        sel = groups == g
        km = KaplanMeierFitter().fit(time[sel], event[sel], label=g)
        ci = km.confidence_interval_survival_function_
        curves[g] = {"n": int(sel.sum()), "events": int(event[sel].sum()),
                     "time": km.survival_function_.index.to_numpy().tolist(),
                     "survival": km.survival_function_.iloc[:, 0].to_numpy().tolist(),
                     "low": ci.iloc[:, 0].to_numpy().tolist(), "high": ci.iloc[:, 1].to_numpy().tolist(),
                     "median_survival": float(km.median_survival_time_)}
    p = float("nan")
    if len(curves) > 1:
        p = float(multivariate_logrank_test(time, groups, event).p_value)
    return {"groups": curves, "logrank_p": p}


def design_matrix(frame: pd.DataFrame, kinds: dict[str, str]) -> pd.DataFrame:
    """Numeric columns as they are; categorical ones as indicators against their first level (the
    lowest risk group for `risk_group`; numbers in numeric order). A categorical column with one
    level gives no column."""
    parts = [pd.DataFrame(index=frame.index)]
    for col, kind in kinds.items():
        if kind == "numeric":
            parts.append(pd.to_numeric(frame[col], errors="coerce").rename(col))
        else:
            values = frame[col].astype("string")
            levels = [g for g in GROUP_ORDER if g in set(values.dropna())] if col == "risk_group" else \
                _natural_order(values.dropna().unique().tolist())
            for level in levels[1:]:
                ind = (values == level).astype(float).where(values.notna())
                parts.append(ind.rename(f"{col}={level}"))
    return pd.concat(parts, axis=1)


def _natural_order(levels: list) -> list:
    """Numbers as numbers ("2" before "10"), else text order."""
    try:
        return sorted(levels, key=float)
    except (TypeError, ValueError):
        return sorted(levels, key=str)


def cox_hazard_ratios(time, event, frame: pd.DataFrame, kinds: dict[str, str]) -> tuple[pd.DataFrame, dict]:
    """Univariate (each covariate alone) and multivariate (all together) Cox models (lifelines):
    hazard ratio, 95% CI and Wald p per term; complete cases, n recorded per model. Also returns
    {covariate: reason} for the models that could not be fitted (one level, too few events)."""
    from lifelines import CoxPHFitter
    from lifelines.exceptions import ConvergenceError

    base = pd.DataFrame({"time": np.asarray(time, float), "event": np.asarray(event).astype(int)})
    rows, skipped = [], {}

    def fit(cols: dict[str, str], analysis: str) -> None:
        x = design_matrix(frame, cols)
        data = pd.concat([base, x.reset_index(drop=True)], axis=1).dropna()
        data = data.loc[:, (data.std() > 0) | data.columns.isin(["time", "event"])]
        name = next(iter(cols)) if analysis == "univariate" else "the multivariate model"
        if data.shape[1] <= 2:
            skipped[name] = "a single level or value in the patients with data: no contrast to estimate"
            return
        if data["event"].sum() < 2:
            skipped[name] = f"{int(data['event'].sum())} event(s) among the complete cases"
            return
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                cph = CoxPHFitter().fit(data, "time", "event")
            except ConvergenceError:  # e.g. a covariate that separates events perfectly: no finite HR
                rows.append({"analysis": analysis, "term": ", ".join(x.columns), "hr": float("nan"),
                             "ci_low": float("nan"), "ci_high": float("nan"), "p": float("nan"), "n": len(data),
                             "events": int(data["event"].sum())})
                return
        s = cph.summary
        for term, r in s.iterrows():
            rows.append({"analysis": analysis, "term": term, "hr": float(r["exp(coef)"]),
                         "ci_low": float(r["exp(coef) lower 95%"]), "ci_high": float(r["exp(coef) upper 95%"]),
                         "p": float(r["p"]), "n": len(data), "events": int(data["event"].sum())})

    for col, kind in kinds.items():
        fit({col: kind}, "univariate")
    fit(kinds, "multivariate")
    return pd.DataFrame(rows, columns=["analysis", "term", "hr", "ci_low", "ci_high", "p", "n", "events"]), skipped


def auc_of(labels: np.ndarray, probs: np.ndarray, classes: list[str]) -> float:
    """ROC AUC (binary: of the second class; more classes: macro one-vs-rest); NaN with one class."""
    from sklearn.metrics import roc_auc_score

    y = np.array([classes.index(str(v)) for v in labels])
    if len(np.unique(y)) < 2:
        return float("nan")
    if len(classes) == 2:
        return float(roc_auc_score(y, probs[:, 1]))
    return float(roc_auc_score(y, probs, multi_class="ovr", labels=list(range(len(classes)))))


def classification_metrics(labels: np.ndarray, probs: np.ndarray, classes: list[str], n_boot: int = 1000,
                           seed: int = 0) -> dict:
    """ROC AUC (bootstrap 95% CI), balanced accuracy, F1 and the confusion matrix (scikit-learn).
    Binary: the second class is the positive one; more classes: macro one-vs-rest AUC and macro F1."""
    from sklearn.metrics import balanced_accuracy_score, confusion_matrix, f1_score

    y = np.array([classes.index(str(v)) for v in labels])
    pred = probs.argmax(1)
    binary = len(classes) == 2

    def auc(idx: np.ndarray) -> float:
        return auc_of(np.asarray(labels)[idx], probs[idx], classes)

    everyone = np.arange(len(y))
    return {"n": len(y), "classes": classes, "auc": auc(everyone),
            "auc_ci": list(bootstrap_ci(auc, len(y), n_boot, seed)),
            "balanced_accuracy": float(balanced_accuracy_score(y, pred)),
            "f1": float(f1_score(y, pred, average="binary" if binary else "macro")),
            "confusion_matrix": confusion_matrix(y, pred, labels=list(range(len(classes)))).tolist()}


def calibration_at(time, event, risk_at_h: np.ndarray, horizon: float, groups: int = 5) -> dict:
    """Calibration of predicted absolute risks of the event by `horizon` (lifelines):

    - observed / expected: Kaplan-Meier risk by the horizon over the mean predicted risk, with the
      Kaplan-Meier 95% interval carried through (1 = calibrated in the large);
    - calibration slope: the Cox coefficient of the outcome on log(-log(1 - predicted risk)), with its
      95% CI (1 = predictions neither too extreme nor too timid);
    - per group of predicted risk (quantiles): mean predicted beside the observed Kaplan-Meier risk.
    """
    from lifelines import CoxPHFitter, KaplanMeierFitter

    time, event = np.asarray(time, float), np.asarray(event).astype(int)
    risk = np.clip(np.asarray(risk_at_h, float), 1e-6, 1 - 1e-6)
    km = KaplanMeierFitter().fit(time, event)
    observed = 1 - float(km.survival_function_at_times(horizon).iloc[0])
    band = km.confidence_interval_survival_function_.loc[:horizon]
    obs_low, obs_high = (1 - band.iloc[-1, 1], 1 - band.iloc[-1, 0]) if len(band) else (0.0, 0.0)
    expected = float(risk.mean())
    out = {"horizon": float(horizon), "observed": observed, "observed_low": float(obs_low),
           "observed_high": float(obs_high), "expected": expected, "o_e": observed / expected,
           "o_e_low": float(obs_low) / expected, "o_e_high": float(obs_high) / expected}
    frame = pd.DataFrame({"time": time, "event": event, "cloglog": np.log(-np.log(1 - risk))})
    if frame["cloglog"].std() > 0 and event.sum() >= 2:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cph = CoxPHFitter().fit(frame, "time", "event")
        s = cph.summary.loc["cloglog"]
        out.update(slope=float(s["coef"]), slope_low=float(s["coef lower 95%"]), slope_high=float(s["coef upper 95%"]))
    edges = np.unique(np.quantile(risk, np.linspace(0, 1, groups + 1)))
    which = np.clip(np.searchsorted(edges[1:-1], risk, side="right"), 0, len(edges) - 2)
    rows = []
    for g in range(len(edges) - 1):
        sel = which == g
        if sel.sum() < 3:
            continue
        kg = KaplanMeierFitter().fit(time[sel], event[sel])
        ci = kg.confidence_interval_survival_function_.loc[:horizon]
        rows.append({"group": g + 1, "n": int(sel.sum()), "predicted": float(risk[sel].mean()),
                     "observed": 1 - float(kg.survival_function_at_times(horizon).iloc[0]),
                     "observed_low": float(1 - ci.iloc[-1, 1]) if len(ci) else 0.0,
                     "observed_high": float(1 - ci.iloc[-1, 0]) if len(ci) else 0.0})
    out["groups"] = rows
    return out


def decision_curve(time, event, risk_at_h: np.ndarray, horizon: float,
                   thresholds: np.ndarray | None = None) -> pd.DataFrame:
    """Net benefit of acting on patients whose predicted risk by `horizon` exceeds a threshold p,
    against acting on everyone and on no one (Vickers et al. 2008, with Kaplan-Meier risks for
    censored outcomes): NB(p) = P(risk > p) [r+ - (1 - r+) p / (1 - p)], r+ the Kaplan-Meier risk by
    the horizon among those above p; treat-all uses the whole cohort's risk."""
    from lifelines import KaplanMeierFitter

    time, event, risk = np.asarray(time, float), np.asarray(event).astype(int), np.asarray(risk_at_h, float)
    thresholds = np.linspace(0.02, 0.6, 30) if thresholds is None else np.asarray(thresholds, float)

    def km_risk(sel: np.ndarray) -> float:
        return 1 - float(KaplanMeierFitter().fit(time[sel], event[sel]).survival_function_at_times(horizon).iloc[0])

    everyone = km_risk(np.ones(len(time), bool))
    rows = []
    for p in thresholds:
        above = risk > p
        share = float(above.mean())
        model = share * (km_risk(above) - (1 - km_risk(above)) * p / (1 - p)) if above.any() else 0.0
        rows.append({"threshold": float(p), "model": model, "treat_all": everyone - (1 - everyone) * p / (1 - p),
                     "treat_none": 0.0, "share_above": share})
    return pd.DataFrame(rows)
