"""Cross-validated evaluation of a trained model's out-of-fold predictions.

For a synthetic cohort, the oracle C-index (the true risk ranked on the same test folds) is the
ceiling a model is measured against.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from fusion.cohort import Cohort
from fusion.storage import write_json, write_table
from fusion.survival import concordance


def evaluate_predictions(model_dir: str | Path, cohort: Cohort) -> dict:
    """Per-fold and mean C-index of `model_dir/predictions.parquet` (+ oracle when known)."""
    model_dir = Path(model_dir)
    preds = pd.read_parquet(model_dir / "predictions.parquet")
    if "risk" not in preds.columns:
        return _evaluate_classification(model_dir, preds)
    truth = true_risk(cohort)
    rows = []
    for fold, p in preds.groupby("fold"):
        row = {"fold": int(fold), "n": len(p), "events": int(p.event.sum()),
               "c_index": concordance(p.time, p.event, p.risk)}
        if truth is not None:
            row["oracle_c_index"] = concordance(p.time, p.event, truth.loc[p.patient_id].to_numpy())
        rows.append(row)
    table = pd.DataFrame(rows)
    result = {"model": model_dir.name, "folds": rows,
              "c_index_mean": float(table.c_index.mean()), "c_index_sd": float(table.c_index.std(ddof=1)),
              "pooled_c_index": concordance(preds.time, preds.event, preds.risk)}
    if truth is not None:
        result["oracle_c_index_mean"] = float(table.oracle_c_index.mean())
        result["oracle_c_index_sd"] = float(table.oracle_c_index.std(ddof=1))
        result["fraction_of_oracle"] = result["c_index_mean"] / result["oracle_c_index_mean"]
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


def compare_models(models_root: str | Path, cohort: Cohort, out_dir: str | Path | None = None) -> pd.DataFrame:
    """One row per trained model or baseline in RUN/models/: C-index mean ± sd over folds (+ oracle),
    best first; written to `out_dir/comparison.csv` when given."""
    rows = [{"model": r["model"], "c_index_mean": r["c_index_mean"], "c_index_sd": r["c_index_sd"],
             "folds": len(r["folds"]), "oracle_c_index_mean": r.get("oracle_c_index_mean"),
             "fraction_of_oracle": r.get("fraction_of_oracle")}
            for r in _evaluations(models_root, cohort) if r.get("task") != "classification"]
    return _ranked(rows, "c_index_mean", out_dir, "comparison.csv")


def compare_classifiers(models_root: str | Path, cohort: Cohort, out_dir: str | Path | None = None) -> pd.DataFrame:
    """One row per classifier in RUN/models/ (`<model>-classification`): AUC mean ± sd over folds and
    balanced accuracy, best first; written to `out_dir/classification.csv` when given."""
    rows = [{"model": r["model"], "auc_mean": r["auc_mean"], "auc_sd": r["auc_sd"],
             "balanced_accuracy_mean": r["balanced_accuracy_mean"], "folds": len(r["folds"])}
            for r in _evaluations(models_root, cohort) if r.get("task") == "classification"]
    return _ranked(rows, "auc_mean", out_dir, "classification.csv")


def _evaluations(models_root: str | Path, cohort: Cohort):
    """`evaluate_predictions` of every model folder under `models_root` that holds predictions."""
    root = Path(models_root)
    for model_dir in sorted(root.iterdir()) if root.exists() else []:
        if (model_dir / "predictions.parquet").exists():
            yield evaluate_predictions(model_dir, cohort)


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
    line = (f"{result['model']}: C-index {result['c_index_mean']:.3f} ± {result['c_index_sd']:.3f}"
            " (mean ± sd over folds)")
    if "oracle_c_index_mean" in result:
        line += (f"; oracle {result['oracle_c_index_mean']:.3f} ± {result['oracle_c_index_sd']:.3f}"
                 f" ({100 * result['fraction_of_oracle']:.0f}% of oracle)")
    return line


__all__ = ["evaluate_predictions", "format_evaluation", "compare_models", "compare_classifiers"]
