"""Cross-validated evaluation of a trained model's out-of-fold predictions.

For a synthetic cohort, the oracle C-index (the true risk ranked on the same test folds) is the
ceiling a model is measured against.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from fusion.cohort import Cohort
from fusion.errors import RunError
from fusion.storage import write_json, write_table
from fusion.survival import concordance
from fusion.survival.crossval import (
    fold_mean_c,
    fraction_of_oracle,
    load_out_of_fold,
    oracle_per_fold,
    paired_difference,
    pooled_c,
)
from fusion.train.folds import read_fold_table


def evaluate_predictions(model_dir: str | Path, cohort: Cohort, n_boot: int = 1000, seed: int = 0) -> dict:
    """Per-fold, fold-mean (with its within-fold bootstrap 95% CI) and common-scale pooled C-index of
    `model_dir/predictions.parquet`, plus the oracle on the same folds when the truth is known.

    The fold-mean C is the headline (see `fusion.survival.crossval`); `fraction_of_oracle` is
    chance-corrected, (C - 0.5) / (C_oracle - 0.5).
    """
    model_dir = Path(model_dir)
    oof = load_out_of_fold(model_dir)
    if oof.task == "classification":
        return _evaluate_classification(model_dir, oof.preds)
    preds = oof.preds
    truth = true_risk(cohort)
    oracle = oracle_per_fold(oof, truth) if truth is not None else {}
    rows = []
    for fold, p in preds.groupby("fold"):
        row = {"fold": int(fold), "n": len(p), "events": int(p.event.sum()),
               "c_index": concordance(p.time, p.event, p.risk)}
        if oracle:
            row["oracle_c_index"] = oracle[int(fold)]
        rows.append(row)
    c = fold_mean_c(oof, n_boot, seed)
    result = {"model": model_dir.name, "task": "survival", "folds": rows, **c,
              "pooled_c_index": pooled_c(oof), "fold_table": oof.fold_table,
              "n_patients": int(len(preds)), "n_events": int(preds.event.sum())}
    if oracle:
        values = np.array([r["oracle_c_index"] for r in rows], float)
        result["oracle_c_index_mean"] = float(np.nanmean(values))
        result["oracle_c_index_sd"] = float(np.nanstd(values, ddof=1))
        result["fraction_of_oracle"] = fraction_of_oracle(result["c_index_mean"], result["oracle_c_index_mean"])
    write_json(model_dir / "evaluation.json", result)
    return result


def _evaluate_classification(model_dir: Path, preds: pd.DataFrame) -> dict:
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score

    classes = [c[len("prob_"):] for c in preds.columns if c.startswith("prob_")]
    rows = []
    for fold, p in preds.groupby("fold"):
        probs = p[[f"prob_{c}" for c in classes]].to_numpy()
        y = np.array([classes.index(v) for v in p.label])
        score = float("nan")
        if len(set(y)) > 1:
            score = roc_auc_score(y, probs[:, 1]) if len(classes) == 2 else \
                roc_auc_score(y, probs, multi_class="ovr", labels=list(range(len(classes))))
        rows.append({"fold": int(fold), "n": len(p), "auc": float(score),
                     "balanced_accuracy": float(balanced_accuracy_score(p.label, p.predicted))})
    table = pd.DataFrame(rows)
    result = {"model": model_dir.name, "task": "classification", "classes": classes, "folds": rows,
              "auc_mean": float(table.auc.mean()), "auc_sd": float(table.auc.std(ddof=1)),
              "balanced_accuracy_mean": float(table.balanced_accuracy.mean())}
    write_json(model_dir / "evaluation.json", result)
    return result


def compare_models(models_root: str | Path, cohort: Cohort, out_dir: str | Path | None = None,
                   n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """One row per trained survival model or baseline in RUN/models/, best fold-mean C first: C mean ±
    sd over folds with its 95% CI, the common-scale pooled C, % of the oracle (chance-corrected), and
    the paired difference to the best model (per-fold mean ± sd, paired bootstrap 95% CI on the
    patients both scored). Models trained on another fold table than the run's are refused.
    Written to `out_dir/comparison.csv` when given."""
    root = Path(models_root)
    evaluations = [r for r in _evaluations(root, cohort, n_boot, seed) if r.get("task") != "classification"]
    _check_same_folds(root, evaluations)
    rows = [{"model": r["model"], "c_index_mean": r["c_index_mean"], "c_index_sd": r["c_index_sd"],
             "ci_low": r["c_index_ci"][0], "ci_high": r["c_index_ci"][1], "pooled_c_index": r["pooled_c_index"],
             "folds": len(r["folds"]), "n_patients": r["n_patients"],
             "oracle_c_index_mean": r.get("oracle_c_index_mean"), "fraction_of_oracle": r.get("fraction_of_oracle")}
            for r in evaluations]
    table = _ranked(rows, "c_index_mean", None, "")
    if len(table):
        best = load_out_of_fold(root / table.model.iat[0])
        paired = [paired_difference(best, load_out_of_fold(root / m), n_boot, seed) if i else None
                  for i, m in enumerate(table.model)]
        table["diff_vs_best_mean"] = [p["diff_mean"] if p else 0.0 for p in paired]
        table["diff_vs_best_sd"] = [p["diff_sd"] if p else 0.0 for p in paired]
        table["diff_vs_best_ci_low"] = [p["diff_ci"][0] if p else 0.0 for p in paired]
        table["diff_vs_best_ci_high"] = [p["diff_ci"][1] if p else 0.0 for p in paired]
        table["diff_vs_best_folds"] = [json.dumps([round(d, 4) for d in p["diff_folds"]]) if p else ""
                                       for p in paired]
        table["n_paired"] = [p["n_patients"] if p else int(table.n_patients.iat[0]) for p in paired]
    if out_dir is not None and len(table):
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        write_table(Path(out_dir) / "comparison.csv", table)
    return table


def best_network(models_root: str | Path, evaluations: list[dict]) -> str:
    """The survival model with fold checkpoints (a network a report can explain) and the highest
    fold-mean C-index among `evaluations`."""
    root = Path(models_root)
    networks = [e for e in evaluations if e.get("task", "survival") == "survival"
                and (root / e["model"] / "fold-0" / "model.safetensors").exists()]
    if not networks:
        raise RunError(f"no trained survival network in {root} to write reports from (baselines keep no weights)")
    return max(networks, key=lambda e: e["c_index_mean"])["model"]


def _check_same_folds(root: Path, evaluations: list[dict]) -> None:
    """Every model must come from the run's fold table (RUN/folds.csv), else a comparison is not paired."""
    table = read_fold_table(root.parent)
    expected = table.fingerprint if table is not None else None
    stale = [r["model"] for r in evaluations if expected is not None and r.get("fold_table") != expected]
    if stale:
        raise RunError(f"model(s) {', '.join(stale)} were trained on another fold table than this run's "
                       f"({root.parent / 'folds.csv'}, fingerprint {expected}); retrain them "
                       f"(`fusion train {root.parent} --model NAME`) before comparing")


def compare_classifiers(models_root: str | Path, cohort: Cohort, out_dir: str | Path | None = None) -> pd.DataFrame:
    """One row per classifier in RUN/models/ (`<model>-classification`): AUC mean ± sd over folds and
    balanced accuracy, best first; written to `out_dir/classification.csv` when given."""
    rows = [{"model": r["model"], "auc_mean": r["auc_mean"], "auc_sd": r["auc_sd"],
             "balanced_accuracy_mean": r["balanced_accuracy_mean"], "folds": len(r["folds"])}
            for r in _evaluations(models_root, cohort) if r.get("task") == "classification"]
    return _ranked(rows, "auc_mean", out_dir, "classification.csv")


def _evaluations(models_root: str | Path, cohort: Cohort, n_boot: int = 1000, seed: int = 0):
    """`evaluate_predictions` of every model folder under `models_root` that holds predictions."""
    root = Path(models_root)
    for model_dir in sorted(root.iterdir()) if root.exists() else []:
        if (model_dir / "predictions.parquet").exists():
            yield evaluate_predictions(model_dir, cohort, n_boot, seed)


def _ranked(rows: list[dict], key: str, out_dir: str | Path | None, filename: str) -> pd.DataFrame:
    """Rows as a table, best `key` first; written atomically to `out_dir/filename` when given."""
    table = pd.DataFrame(rows)
    if not len(table):
        return table
    table = table.sort_values(key, ascending=False).reset_index(drop=True)
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        write_table(Path(out_dir) / filename, table)
    return table


def true_risk(cohort: Cohort) -> pd.Series | None:
    """The synthetic cohort's true risk per patient (truth/patients.csv), None for a real cohort."""
    path = cohort.root / "truth" / "patients.csv"
    if not path.exists():
        return None
    t = pd.read_csv(path, dtype={"patient_id": str})
    if "true_risk" not in t:
        return None
    return t.set_index("patient_id")["true_risk"].astype(float)


def format_evaluation(result: dict) -> str:
    if result.get("task") == "classification":
        return (f"{result['model']}: AUC {result['auc_mean']:.3f} ± {result['auc_sd']:.3f} (mean ± sd over folds), "
                f"balanced accuracy {result['balanced_accuracy_mean']:.3f}")
    low, high = result.get("c_index_ci", [float("nan")] * 2)
    line = (f"{result['model']}: C-index {result['c_index_mean']:.3f} ± {result['c_index_sd']:.3f}"
            f" (mean ± sd over folds; 95% CI {low:.3f}-{high:.3f}; pooled on the training-fold scale "
            f"{result.get('pooled_c_index', float('nan')):.3f})")
    if "oracle_c_index_mean" in result:
        line += (f"; oracle {result['oracle_c_index_mean']:.3f} ± {result['oracle_c_index_sd']:.3f}"
                 f" ({100 * result['fraction_of_oracle']:.0f}% of the oracle above chance)")
    return line


__all__ = ["evaluate_predictions", "format_evaluation", "compare_models", "compare_classifiers"]
