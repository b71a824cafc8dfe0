"""Scheduled scoring: new patients dropped into an inbox folder join a scoring cohort, are scored
with a trained model's fold ensemble, and leave the inbox (no Prefect here; see flows/scoring.py).

The inbox is a cohort folder (same format: slide files, `slides.csv`, `patients.csv`, optional
`genomics.csv`; its `cohort.yaml` is copied from the training cohort when missing). Intake is
ordered so that a crash at any point is repaired by the next run: files are copied into the
scoring cohort, the scoring tables are rewritten (atomically), then the inbox rows and files are
removed. Patients of the scoring cohort without a prediction are scored on the next run whatever
happened before.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pandas as pd

from fusion.cohort import COHORT_FILE, Cohort, load_cohort, load_spec, read_table
from fusion.run import RunLayout
from fusion.storage import atomic_path, write_table, write_text


def intake_inbox(inbox: str | Path, cohort_dir: str | Path, template: str | Path) -> list[str]:
    """Move the inbox's new slides and patients into the scoring cohort at `cohort_dir`.

    Returns the ids of the patients that came in (new patients and patients with a new slide).
    The whole inbox is validated first (every problem at once, `CohortError`); nothing moves then.
    """
    inbox, cohort_dir = Path(inbox), Path(cohort_dir)
    spec_source = Path(template) / COHORT_FILE
    patients_table = inbox / load_spec(Path(template)).tables.patients
    if not patients_table.exists() or read_table(patients_table).empty:
        return []
    if not (inbox / COHORT_FILE).exists():
        write_text(inbox / COHORT_FILE, spec_source.read_text())
    if not (cohort_dir / COHORT_FILE).exists():
        write_text(cohort_dir / COHORT_FILE, (inbox / COHORT_FILE).read_text())
    incoming = load_cohort(inbox)
    spec = incoming.spec
    current = _tables(cohort_dir, spec)

    new_slides = incoming.slides[~incoming.slides.slide_id.isin(current["slides"].get("slide_id", []))]
    new_patients = incoming.patients[~incoming.patients.patient_id.isin(current["patients"].get("patient_id", []))]
    arrived = sorted(set(new_slides.patient_id) | set(new_patients.patient_id))

    copied = []
    for row in new_slides.itertuples():  # 1. copy files (the inbox keeps its own until step 3)
        target = cohort_dir / "slides" / f"{row.slide_id}{''.join(Path(row.path).suffixes)}"
        if not target.exists():
            with atomic_path(target) as tmp:
                shutil.copyfile(row.path, tmp)
        copied.append({"slide_id": row.slide_id, "patient_id": row.patient_id,
                       "path": str(target.relative_to(cohort_dir))})
    raw = _tables(inbox, spec)  # 2. the scoring tables, with the inbox rows as the user wrote them
    write_table(cohort_dir / spec.tables.slides, pd.concat([current["slides"], pd.DataFrame(copied)]))
    for role in ("patients", "genomics"):
        if role in raw:
            rows = raw[role][raw[role].patient_id.isin(new_patients.patient_id)]
            write_table(cohort_dir / getattr(spec.tables, role), pd.concat([current.get(role, pd.DataFrame()), rows]))

    taken = set(incoming.patients.patient_id)  # 3. the inbox forgets what the scoring cohort now holds
    for name, table in raw.items():
        write_table(inbox / getattr(spec.tables, name), table[~table.patient_id.isin(taken)])
    for path in incoming.slides.path:
        Path(path).unlink(missing_ok=True)
    return arrived


def _tables(folder: Path, spec) -> dict[str, pd.DataFrame]:
    out = {}
    for role in ("slides", "patients", "genomics"):
        name = getattr(spec.tables, role)
        if name and (folder / name).exists():
            out[role] = read_table(folder / name)
        elif role != "genomics":
            out[role] = pd.DataFrame()
    return out


def unscored(layout: RunLayout, cohort: Cohort, model: str) -> list[str]:
    """Patients of the scoring cohort without a stored prediction from `model`."""
    path = predictions_path(layout, model)
    done = set(pd.read_parquet(path, columns=["patient_id"]).patient_id) if path.exists() else set()
    return [p for p in cohort.patients.patient_id if p not in done]


def predictions_path(layout: RunLayout, model: str) -> Path:
    return layout.root / "predictions" / f"{model}.parquet"


def subset_cohort(cohort: Cohort, patient_ids: list[str]) -> Cohort:
    """The same cohort restricted to `patient_ids` (for scoring a batch)."""
    keep = set(patient_ids)
    genomics = None if cohort.genomics is None else cohort.genomics[cohort.genomics.index.isin(keep)]
    return dataclasses.replace(cohort, patients=cohort.patients[cohort.patients.patient_id.isin(keep)],
                               slides=cohort.slides[cohort.slides.patient_id.isin(keep)].reset_index(drop=True),
                               genomics=genomics)


def merge_predictions(layout: RunLayout, model: str, scores: pd.DataFrame, batch: str) -> Path:
    """Add a batch's scores to RUN/predictions/<model>.parquet (a patient scored again replaces its row)."""
    path = predictions_path(layout, model)
    scores = scores.assign(batch=batch)
    if path.exists():
        old = pd.read_parquet(path)
        scores = pd.concat([old[~old.patient_id.isin(scores.patient_id)], scores], ignore_index=True)
    write_table(path, scores)
    return path


def model_encoder(model_dir: str | Path) -> tuple[str, str]:
    """(encoder, tile set) a trained model's features came from, read from its first fold's config."""
    import json

    config = json.loads((Path(model_dir) / "fold-0" / "config.json").read_text())
    return config["encoder"], config.get("train_config", {}).get("tile_set", "")


__all__ = ["intake_inbox", "unscored", "subset_cohort", "merge_predictions", "model_encoder", "predictions_path"]
