"""The run's fold table: which cross-validation fold each patient is tested in, fixed once per run.

Every model and baseline of a run is trained and evaluated on the same patient folds, whatever
modalities a patient has: a patient whose slides failed to tile still belongs to its fold and is
scored by the models that can score it. The table is made from the cohort's patients (not from the
patients a model happens to have features for), written once as `RUN/folds.csv` (patient_id, fold)
with `RUN/folds.json` (k, seed, stratification, fingerprint), and every model records the
fingerprint it was trained on. Training with another number of folds or seed than the table's is
refused, as is comparing models trained on different tables.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedKFold

from fusion.errors import RunError
from fusion.storage import hash_config, write_json, write_table

FOLDS_CSV = "folds.csv"
FOLDS_JSON = "folds.json"


@dataclass(frozen=True)
class FoldTable:
    """patient_id -> fold (0..k-1), with how it was made."""

    fold: pd.Series  # int fold per patient id, index = patient ids
    k: int
    seed: int
    stratify: str  # what the folds are stratified by ("event")

    @property
    def fingerprint(self) -> str:
        return fold_fingerprint(self.fold, self.k, self.seed, self.stratify)

    def splits(self, ids: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        """k (train_idx, test_idx) pairs of positions in `ids`; every id must be in the table."""
        missing = [p for p in ids if p not in self.fold.index]
        if missing:
            raise RunError(f"{len(missing)} patient(s) are not in the run's fold table ({FOLDS_CSV}): "
                           f"{', '.join(map(str, missing[:10]))}{' ...' if len(missing) > 10 else ''}; "
                           "the cohort gained patients since the folds were made: rebuild the table with "
                           "`fusion folds RUN --rebuild` (every model then retrains on the new folds)")
        fold = self.fold.loc[list(ids)].to_numpy()
        return [(np.flatnonzero(fold != k), np.flatnonzero(fold == k)) for k in range(self.k)]

    def describe(self) -> dict:
        return {"k": self.k, "seed": self.seed, "stratify": self.stratify, "fingerprint": self.fingerprint,
                "n_patients": int(len(self.fold))}


def fold_fingerprint(fold: pd.Series, k: int, seed: int, stratify: str) -> str:
    """Hash of the assignment (sorted by patient id) and of how it was made."""
    pairs = sorted((str(p), int(f)) for p, f in fold.items())
    return hash_config({"folds": pairs, "k": k, "seed": seed, "stratify": stratify})


def make_fold_table(ids: list[str], event: np.ndarray, k: int, seed: int = 0) -> FoldTable:
    """k-fold assignment of `ids` stratified by event (a patient whose outcome is not known yet, kept
    for a classification label, is a stratum of its own), so that every test fold has its events."""
    ids = [str(p) for p in ids]
    event = np.asarray(event, float)
    strata = np.where(np.isnan(event), 2, event).astype(int)
    if k < 2 or k > len(ids):
        raise ValueError(f"folds must be between 2 and the number of patients ({len(ids)}), got {k}")
    n_minority = min(np.bincount(strata[strata < 2], minlength=2))
    if n_minority < k:
        raise ValueError(f"only {n_minority} patients in the rarer event class: too few for {k} folds")
    fold = np.zeros(len(ids), int)
    skf = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    for f, (_, test) in enumerate(skf.split(np.zeros(len(ids)), strata)):
        fold[test] = f
    return FoldTable(pd.Series(fold, index=pd.Index(ids, name="patient_id"), name="fold"), k, seed, "event")


def write_fold_table(root: str | Path, table: FoldTable) -> None:
    root = Path(root)
    write_table(root / FOLDS_CSV, table.fold.rename("fold").reset_index())
    write_json(root / FOLDS_JSON, table.describe())  # last: its fingerprint vouches for the csv


def read_fold_table(root: str | Path) -> FoldTable | None:
    """The run's table, or None when the run has none yet. A table whose content no longer matches
    the fingerprint written with it (edited by hand, half-copied) is refused."""
    root = Path(root)
    meta_path, csv_path = root / FOLDS_JSON, root / FOLDS_CSV
    if not meta_path.exists():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        frame = pd.read_csv(csv_path, dtype={"patient_id": str})
        fold = frame.set_index("patient_id")["fold"].astype(int)
        table = FoldTable(fold, int(meta["k"]), int(meta["seed"]), str(meta["stratify"]))
    except (OSError, ValueError, KeyError) as e:
        raise RunError(f"the fold table {csv_path} cannot be read ({e}); rebuild it with "
                       "`fusion folds RUN --rebuild`") from None
    if table.fingerprint != meta.get("fingerprint") or fold.index.duplicated().any() or \
            not fold.between(0, table.k - 1).all():
        raise RunError(f"{csv_path} does not match the fingerprint in {meta_path} (edited or half-copied?); "
                       "rebuild it with `fusion folds RUN --rebuild`")
    return table


def cohort_fold_table(patients: pd.DataFrame, time_col: str, event_col: str, label_col: str | None,
                      k: int, seed: int) -> FoldTable:
    """The table over every patient with a known outcome or label (slides, features or not)."""
    time = pd.to_numeric(patients[time_col], errors="coerce")
    event = pd.to_numeric(patients[event_col], errors="coerce").where(time.notna())
    keep = time.notna()
    if label_col:
        keep |= patients[label_col].notna()
    ids = patients.loc[keep, "patient_id"].astype(str).tolist()
    return make_fold_table(ids, event[keep].to_numpy(float), k, seed)


def ensure_fold_table(root: str | Path, cohort, k: int, seed: int, rebuild: bool = False) -> FoldTable:
    """The run's fold table, made from `cohort` on first use (or when `rebuild`).

    An existing table is checked against what the caller asks for: another k or seed is refused
    with the table's own values, so that two models of one run never see different folds.
    """
    existing = None if rebuild else read_fold_table(root)
    if existing is not None:
        if (existing.k, existing.seed) != (k, seed):
            raise RunError(f"this run's fold table ({Path(root) / FOLDS_CSV}) has {existing.k} folds with seed "
                           f"{existing.seed}; training with {k} folds and seed {seed} would compare models on "
                           f"different patients: use folds={existing.k}, seed={existing.seed}, or a new run")
        return existing
    spec = cohort.spec
    table = cohort_fold_table(cohort.patients, spec.outcome.time, spec.outcome.event, spec.label, k, seed)
    write_fold_table(root, table)
    return table


__all__ = ["FoldTable", "make_fold_table", "ensure_fold_table", "read_fold_table", "write_fold_table",
           "fold_fingerprint", "FOLDS_CSV"]
