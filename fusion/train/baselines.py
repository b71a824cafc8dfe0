"""Baselines every comparison shows, trained on the run's folds and the same preprocessing as the models:

    clinical_cox   Cox proportional hazards on the clinical covariates (lifelines, ridge 0.1)
    coxnet         elastic-net penalised Cox on genomics + clinical (scikit-survival's Coxnet), the
                   penalty (alpha, l1 ratio) chosen by 5-fold cross-validation inside each training fold
    rsf            random survival forest on genomics + clinical (scikit-survival)

(`genomics_snn` and image-only `abmil` are registered models trained by the common loop.)
Fitted sklearn estimators can only be stored by pickling, so a baseline run keeps its predictions,
metrics and configuration (with the chosen penalty and coefficients as JSON), not the fitted object.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from fusion.storage import hash_config, write_json, write_table
from fusion.survival import concordance
from fusion.survival.horizons import surv_column
from fusion.train.data import Bags, Preprocessor
from fusion.train.folds import FoldTable, make_fold_table
from fusion.train.loop import risk_cutoffs, survival_horizons

BASELINES = ("clinical_cox", "coxnet", "rsf")
COXNET_L1_RATIOS = (0.1, 0.5, 0.9)
COXNET_INNER_FOLDS = 5


def _design(tab: dict[str, np.ndarray], kind: str) -> np.ndarray:
    if kind == "clinical_cox":
        return tab["clinical"]
    return np.concatenate([tab["genomics"], tab["genomics_mask"][:, None].astype(np.float32), tab["clinical"]], 1)


def _fit_predict(kind: str, x_train, time, event, x_test, seed: int,
                 horizons: list[float]) -> tuple[np.ndarray, np.ndarray, dict]:
    """Fit on the training rows; risk [P] and survival at `horizons` [P, T] of `x_test`, fitted parameters."""
    if kind == "clinical_cox":
        return _clinical_cox(x_train, time, event, x_test, horizons)
    if kind == "coxnet":
        return _coxnet(x_train, time, event, x_test, seed, horizons)
    from sksurv.ensemble import RandomSurvivalForest
    from sksurv.util import Surv

    rsf = RandomSurvivalForest(n_estimators=200, min_samples_leaf=5, max_features="sqrt", n_jobs=-1,
                               random_state=seed).fit(x_train, Surv.from_arrays(event.astype(bool), time))
    return rsf.predict(x_test), _step_functions_at(rsf.predict_survival_function(x_test), horizons), {}


def _clinical_cox(x_train, time, event, x_test, horizons):
    from lifelines import CoxPHFitter

    cols = [f"x{i}" for i in range(x_train.shape[1])]
    keep = x_train.std(0) > 0  # constant columns (a category absent from the fold) break the fit
    df = pd.DataFrame(x_train[:, keep], columns=np.array(cols)[keep])
    df["time"], df["event"] = time, event.astype(int)
    cph = CoxPHFitter(penalizer=0.1).fit(df, "time", "event")
    test = pd.DataFrame(x_test[:, keep], columns=np.array(cols)[keep])
    surv = cph.predict_survival_function(test, times=horizons).to_numpy().T
    return np.asarray(cph.predict_log_partial_hazard(test), float), surv, {"coefficients": cph.params_.to_dict()}


def _coxnet(x_train, time, event, x_test, seed: int, horizons):
    """Elastic-net Cox; (alpha, l1 ratio) maximise the mean Harrell C over inner folds of the training rows."""
    from sklearn.model_selection import StratifiedKFold
    from sklearn.preprocessing import StandardScaler
    from sksurv.linear_model import CoxnetSurvivalAnalysis
    from sksurv.util import Surv

    scaler = StandardScaler().fit(x_train)
    xs, xt = scaler.transform(x_train), scaler.transform(x_test)
    y = Surv.from_arrays(event.astype(bool), time)
    inner = list(StratifiedKFold(COXNET_INNER_FOLDS, shuffle=True, random_state=seed).split(xs, event))
    best = (-np.inf, None, None)
    for l1 in COXNET_L1_RATIOS:
        alphas = CoxnetSurvivalAnalysis(l1_ratio=l1, n_alphas=40, alpha_min_ratio=0.01).fit(xs, y).alphas_
        scores = np.zeros(len(alphas))
        for tr, va in inner:
            path = CoxnetSurvivalAnalysis(l1_ratio=l1, alphas=alphas).fit(xs[tr], y[tr])
            for j, a in enumerate(alphas):
                c = concordance(time[va], event[va], path.predict(xs[va], alpha=a))
                scores[j] += (0.5 if np.isnan(c) else c) / len(inner)
        j = int(np.argmax(scores))
        if scores[j] > best[0]:
            best = (scores[j], l1, float(alphas[j]))
    inner_c, l1, alpha = best
    model = CoxnetSurvivalAnalysis(l1_ratio=l1, alphas=[alpha], fit_baseline_model=True).fit(xs, y)
    risk = model.predict(xt, alpha=alpha)
    surv = _step_functions_at(model.predict_survival_function(xt, alpha=alpha), horizons)
    coef = model.coef_[:, 0]
    return risk, surv, {"alpha": alpha, "l1_ratio": l1, "inner_c_index": float(inner_c),
                        "nonzero_coefficients": int((coef != 0).sum()), "coefficients": coef.tolist()}


def _step_functions_at(functions, horizons: list[float]) -> np.ndarray:
    """S(t) [P, T] of scikit-survival step functions, each clipped to its own domain."""
    return np.stack([[fn(np.clip(h, fn.domain[0], fn.domain[1])) for h in horizons] for fn in functions]) \
        if len(horizons) else np.zeros((len(functions), 0))


def cross_validate_baseline(bags: Bags, kind: str, folds: int, seed: int, max_genes: int, out_dir: str | Path,
                            table: FoldTable | None = None) -> dict:
    """The run's fold table (or one made from these bags); writes predictions and metrics per fold."""
    if kind not in BASELINES:
        raise ValueError(f"unknown baseline '{kind}'; available: {', '.join(BASELINES)}")
    out_dir = Path(out_dir)
    table = table or make_fold_table(bags.ids, bags.event, folds, seed)
    rows, preds, fold_horizons = [], [], []
    for k, (train_idx, test_idx) in enumerate(table.splits(bags.ids)):
        train = bags.subset(train_idx)
        prep = Preprocessor(max_genes).fit(train)
        tab = prep.transform(bags)
        x = _design(tab, kind)
        horizons = survival_horizons(train)
        both, surv, params = _fit_predict(kind, x[train_idx], bags.time[train_idx], bags.event[train_idx],
                                          np.concatenate([x[test_idx], x[train_idx]]), seed + k, horizons)
        risk, train_risk = both[:len(test_idx)], both[len(test_idx):]
        c = concordance(bags.time[test_idx], bags.event[test_idx], risk)
        rows.append({"fold": k, "c_index": c, "n_test": len(test_idx)})
        fold_dir = out_dir / f"fold-{k}"
        pred = pd.DataFrame({"patient_id": [bags.ids[i] for i in test_idx], "fold": k, "risk": risk,
                             "time": bags.time[test_idx], "event": bags.event[test_idx].astype(int)})
        for j, h in enumerate(horizons):
            pred[surv_column(h)] = surv[:len(test_idx), j]
        write_table(fold_dir / "predictions.parquet", pred)
        write_json(fold_dir / "metrics.json", {"fold": k, "c_index": c, "horizons": horizons,
                                               "train_risk_cutoffs": risk_cutoffs(train_risk),
                                               "fold_table": table.fingerprint, **params})
        preds.append(pred)
        fold_horizons.append(horizons)
    cs = np.array([r["c_index"] for r in rows])
    config = {"model": kind, "folds": table.k, "seed": seed, "max_genes": max_genes}
    summary = {"model": kind, "c_index_mean": float(np.nanmean(cs)), "c_index_sd": float(np.nanstd(cs, ddof=1)),
               "c_index_folds": cs.tolist(), "n_patients": len(bags), "n_events": int(bags.event.sum()),
               "config": config, "config_hash": hash_config(config), "horizons": fold_horizons,
               "folds": table.k, "fold_table": table.describe()}
    write_json(out_dir / "cv_metrics.json", summary)
    write_table(out_dir / "predictions.parquet", pd.concat(preds))
    return summary
