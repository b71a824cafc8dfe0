"""Baselines every comparison shows, trained on the same folds and preprocessing as the models:

    clinical_cox   Cox proportional hazards on the clinical covariates (lifelines, ridge 0.1)
    rsf            random survival forest on genomics + clinical (scikit-survival)

(`genomics_snn` and image-only `abmil` are registered models trained by the common loop.)
Fitted sklearn forests can only be stored by pickling, so a baseline run keeps its predictions,
metrics and configuration, not the fitted object; the Cox coefficients are written as JSON.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from fusion.storage import hash_config, write_json, write_table
from fusion.survival import concordance
from fusion.train.data import Bags, Preprocessor
from fusion.train.loop import risk_cutoffs, survival_horizons
from fusion.train.splits import cv_folds

BASELINES = ("clinical_cox", "rsf")


def _design(tab: dict[str, np.ndarray], kind: str) -> np.ndarray:
    if kind == "clinical_cox":
        return tab["clinical"]
    return np.concatenate([tab["genomics"], tab["genomics_mask"][:, None].astype(np.float32), tab["clinical"]], 1)


def _fit_predict(kind: str, x_train, time, event, x_test, seed: int,
                 horizons: list[float]) -> tuple[np.ndarray, np.ndarray, dict]:
    """Fit on the training rows; risk [P] and survival at `horizons` [P, T] of `x_test`, fitted parameters."""
    if kind == "clinical_cox":
        from lifelines import CoxPHFitter

        cols = [f"x{i}" for i in range(x_train.shape[1])]
        keep = x_train.std(0) > 0  # constant columns (a category absent from the fold) break the fit
        df = pd.DataFrame(x_train[:, keep], columns=np.array(cols)[keep])
        df["time"], df["event"] = time, event.astype(int)
        cph = CoxPHFitter(penalizer=0.1).fit(df, "time", "event")
        test = pd.DataFrame(x_test[:, keep], columns=np.array(cols)[keep])
        surv = cph.predict_survival_function(test, times=horizons).to_numpy().T
        return np.asarray(cph.predict_log_partial_hazard(test), float), surv, {"coefficients": cph.params_.to_dict()}
    from sksurv.ensemble import RandomSurvivalForest
    from sksurv.util import Surv

    rsf = RandomSurvivalForest(n_estimators=200, min_samples_leaf=5, max_features="sqrt", n_jobs=-1,
                               random_state=seed).fit(x_train, Surv.from_arrays(event.astype(bool), time))
    curves = rsf.predict_survival_function(x_test)
    surv = np.stack([[fn(np.clip(h, fn.domain[0], fn.domain[1])) for h in horizons] for fn in curves])
    return rsf.predict(x_test), surv, {}


def cross_validate_baseline(bags: Bags, kind: str, folds: int, seed: int, max_genes: int, out_dir: str | Path) -> dict:
    """Same patient-level folds as `cross_validate` (same seed); writes predictions and metrics."""
    if kind not in BASELINES:
        raise ValueError(f"unknown baseline '{kind}'; available: {', '.join(BASELINES)}")
    out_dir = Path(out_dir)
    rows, preds = [], []
    horizons = survival_horizons(bags)
    for k, (train_idx, test_idx) in enumerate(cv_folds(bags.event, folds, seed)):
        prep = Preprocessor(max_genes).fit(bags.subset(train_idx))
        tab = prep.transform(bags)
        x = _design(tab, kind)
        both, surv, params = _fit_predict(kind, x[train_idx], bags.time[train_idx], bags.event[train_idx],
                                          np.concatenate([x[test_idx], x[train_idx]]), seed + k, horizons)
        risk, train_risk = both[:len(test_idx)], both[len(test_idx):]
        c = concordance(bags.time[test_idx], bags.event[test_idx], risk)
        rows.append({"fold": k, "c_index": c, "n_test": len(test_idx)})
        fold_dir = out_dir / f"fold-{k}"
        write_json(fold_dir / "metrics.json", {"fold": k, "c_index": c, "train_risk_cutoffs": risk_cutoffs(train_risk),
                                               **params})
        pred = pd.DataFrame({"patient_id": [bags.ids[i] for i in test_idx], "fold": k, "risk": risk,
                             "time": bags.time[test_idx], "event": bags.event[test_idx].astype(int)})
        for j, h in enumerate(horizons):
            pred[f"surv_{h:g}"] = surv[:len(test_idx), j]
        write_table(fold_dir / "predictions.parquet", pred)
        preds.append(pred)
    cs = np.array([r["c_index"] for r in rows])
    config = {"model": kind, "folds": folds, "seed": seed, "max_genes": max_genes}
    summary = {"model": kind, "c_index_mean": float(np.nanmean(cs)), "c_index_sd": float(np.nanstd(cs, ddof=1)),
               "c_index_folds": cs.tolist(), "n_patients": len(bags), "n_events": int(bags.event.sum()),
               "config": config, "config_hash": hash_config(config), "horizons": horizons}
    write_json(out_dir / "cv_metrics.json", summary)
    write_table(out_dir / "predictions.parquet", pd.concat(preds))
    return summary

