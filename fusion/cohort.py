"""Cohort folder: `cohort.yaml` + slides / patients / genomics tables, loaded and validated.

Validation collects every problem (file, line, column, what is wrong) and raises one
`CohortError` listing them all, so a user fixes a table in one pass instead of one error a run.
Line numbers are the lines of the file as a spreadsheet or editor shows them: the header is
line 1, the first patient line 2.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fusion.errors import CohortError

COHORT_FILE = "cohort.yaml"


class Tables(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    slides: str = "slides.csv"
    patients: str = "patients.csv"
    genomics: str | None = None


class Outcome(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    time: str = "time"
    event: str = "event"


class IntendedUse(BaseModel):
    """Who a model trained on this cohort is for: printed on every clinician report."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    population: str = "patients like those of this cohort (its inclusion criteria were not stated in cohort.yaml)"
    predicts: str = "the cohort's survival outcome"
    not_for: str = "clinical decisions: research use only"


class CohortSpec(BaseModel):
    """The contents of `cohort.yaml`: which tables, and the role of each column."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = "cohort"
    description: str | None = None  # where the data come from, what was left out
    intended_use: IntendedUse = Field(default_factory=IntendedUse)
    time_unit: Literal["days", "weeks", "months", "years"] = "months"
    tables: Tables = Field(default_factory=Tables)
    outcome: Outcome = Field(default_factory=Outcome)
    label: str | None = None
    clinical: dict[str, Literal["numeric", "categorical"]] = Field(default_factory=dict)
    genomics: list[str] | Literal["all"] = "all"
    # Slide paths must stay inside the cohort folder (a table cannot point the pipeline at arbitrary
    # files); a data owner who keeps slides elsewhere says so here.
    allow_external_paths: bool = False


@dataclass(frozen=True)
class Cohort:
    """A validated cohort. `patients` is indexed by patient_id; `genomics` too (or None)."""

    root: Path
    spec: CohortSpec
    slides: pd.DataFrame  # columns slide_id, patient_id, path (absolute)
    patients: pd.DataFrame
    genomics: pd.DataFrame | None

    @property
    def time(self) -> np.ndarray:
        return self.patients[self.spec.outcome.time].to_numpy(dtype=float)

    @property
    def event(self) -> np.ndarray:
        return self.patients[self.spec.outcome.event].to_numpy().astype(bool)

    @property
    def gene_columns(self) -> list[str]:
        return [] if self.genomics is None else list(self.genomics.columns)

    def slides_of(self, patient_id: str) -> pd.DataFrame:
        return self.slides[self.slides.patient_id == patient_id]


def read_table(path: Path) -> pd.DataFrame:
    """Read CSV or Parquet by extension; ids are kept as strings."""
    if path.suffix.lower() in {".parquet", ".pq"}:
        df = pd.read_parquet(path)
    else:
        df = pd.read_csv(path, dtype={"patient_id": str, "slide_id": str})
    for col in ("patient_id", "slide_id"):
        if col in df.columns:
            df[col] = df[col].astype("string").str.strip().astype(object)
    return df


def load_spec(root: Path) -> CohortSpec:
    path = root / COHORT_FILE
    if not path.is_file():
        raise CohortError(str(root), [f"{COHORT_FILE} not found in {root}"])
    try:
        raw = yaml.safe_load(path.read_text()) or {}
        return CohortSpec.model_validate(raw)
    except yaml.YAMLError as e:
        raise CohortError(str(path), [f"not valid YAML: {e}"]) from None
    except ValidationError as e:
        problems = [f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()]
        raise CohortError(str(path), problems) from None


def load_cohort(root: str | Path, *, check_files: bool = True) -> Cohort:
    """Load and validate a cohort folder; raise `CohortError` listing every problem."""
    root = Path(root).resolve()
    spec = load_spec(root)
    problems: list[str] = []

    tables: dict[str, pd.DataFrame | None] = {}
    for role in ("slides", "patients", "genomics"):
        name = getattr(spec.tables, role)
        if name is None:
            tables[role] = None
            continue
        path = root / name
        if not path.is_file():
            problems.append(f"{name}: file not found (named as tables.{role} in {COHORT_FILE})")
            tables[role] = None
            continue
        try:
            tables[role] = read_table(path)
        except Exception as e:  # noqa: BLE001 - any parser failure is a cohort problem
            problems.append(f"{name}: cannot be read: {e}")
            tables[role] = None

    patients, slides, genomics = tables["patients"], tables["slides"], tables["genomics"]
    if patients is not None:
        problems += _check_patients(patients, spec)
    if slides is not None:
        problems += _check_slides(slides, spec, root, patients, check_files)
    if genomics is not None:
        problems += _check_genomics(genomics, spec, patients)
    if problems:
        raise CohortError(str(root), problems)

    if patients is None or slides is None:  # a missing table is already a problem above; kept for clarity
        raise CohortError(str(root), ["the slides and patients tables are required"])
    patients = patients.set_index("patient_id", drop=False)
    patients.index.name = None
    slides = slides.assign(path=[str((root / p).resolve()) for p in slides["path"]])
    if genomics is not None:
        cols = [c for c in genomics.columns if c != "patient_id"]
        if spec.genomics != "all":
            cols = list(spec.genomics)
        genomics = genomics.set_index("patient_id")[cols].astype(float)
        genomics.index.name = None
    return Cohort(root, spec, slides.reset_index(drop=True), patients, genomics)


def _line(i: int) -> str:
    return f"line {i + 2}"  # header is line 1


def _missing_columns(df: pd.DataFrame, needed: list[str], table: str) -> list[str]:
    return [f"{table}: missing column '{c}'" for c in needed if c not in df.columns]


def _duplicates(df: pd.DataFrame, col: str, table: str) -> list[str]:
    dup = df[col].duplicated(keep="first") & df[col].notna()
    return [f"{table} {_line(i)}: duplicate {col} '{df[col].iat[i]}'" for i in np.flatnonzero(dup)]


def _blank_ids(df: pd.DataFrame, col: str, table: str) -> list[str]:
    blank = df[col].isna() | (df[col].astype(str).str.len() == 0)
    return [f"{table} {_line(i)}: empty {col}" for i in np.flatnonzero(blank)]


def _check_patients(df: pd.DataFrame, spec: CohortSpec) -> list[str]:
    t = spec.tables.patients
    time_col, event_col = spec.outcome.time, spec.outcome.event
    needed = ["patient_id", time_col, event_col, *spec.clinical]
    if spec.label:
        needed.append(spec.label)
    problems = _missing_columns(df, needed, t)
    if "patient_id" in df.columns:
        problems += _blank_ids(df, "patient_id", t) + _duplicates(df, "patient_id", t)
    problems += _check_outcomes(df, t, time_col, event_col)
    for col, kind in spec.clinical.items():
        if kind == "numeric" and col in df.columns:
            values = pd.to_numeric(df[col], errors="coerce")
            bad = values.isna() & df[col].notna()
            for i in np.flatnonzero(bad):
                problems.append(f"{t} {_line(i)}: clinical '{col}' is numeric, got '{df[col].iat[i]}'")
    return problems


def _check_outcomes(df: pd.DataFrame, t: str, time_col: str, event_col: str) -> list[str]:
    """Outcome cells: numbers, non-negative times, 0/1 events; both blank = outcome not known yet."""
    problems = []
    # Both outcome cells blank: the outcome is not known yet (a patient to score, not to train on).
    if time_col in df.columns and event_col in df.columns:
        for i in np.flatnonzero(df[time_col].isna() != df[event_col].isna()):
            problems.append(f"{t} {_line(i)}: {time_col} and {event_col} must be both given or both blank "
                            "(blank: outcome not known yet)")
    if time_col in df.columns:
        time = pd.to_numeric(df[time_col], errors="coerce")
        for i in np.flatnonzero(time.isna() & df[time_col].notna()):
            problems.append(f"{t} {_line(i)}: {time_col} '{df[time_col].iat[i]}' is not a number")
        for i in np.flatnonzero(time < 0):
            problems.append(f"{t} {_line(i)}: {time_col} is negative ({time.iat[i]})")
    if event_col in df.columns:
        event = pd.to_numeric(df[event_col], errors="coerce")
        for i in np.flatnonzero(~event.isin([0, 1]) & df[event_col].notna()):
            problems.append(f"{t} {_line(i)}: {event_col} must be 0 or 1, got '{df[event_col].iat[i]}'")
    return problems


def _check_slides(
    df: pd.DataFrame, spec: CohortSpec, root: Path, patients: pd.DataFrame | None, check_files: bool
) -> list[str]:
    t = spec.tables.slides
    problems = _missing_columns(df, ["slide_id", "patient_id", "path"], t)
    if problems:
        return problems
    problems += _blank_ids(df, "slide_id", t) + _duplicates(df, "slide_id", t)
    known = set(patients["patient_id"]) if patients is not None and "patient_id" in patients else None
    for i, (pid, rel) in enumerate(zip(df["patient_id"], df["path"], strict=True)):
        if known is not None and pid not in known:
            problems.append(f"{t} {_line(i)}: patient_id '{pid}' is not in {spec.tables.patients}")
        if not isinstance(rel, str) or not rel:
            problems.append(f"{t} {_line(i)}: empty path")
        elif not spec.allow_external_paths and not (root / rel).resolve().is_relative_to(root):
            problems.append(f"{t} {_line(i)}: path '{rel}' leaves the cohort folder; move the slide inside it "
                            f"or set `allow_external_paths: true` in {COHORT_FILE}")
        elif check_files and not (root / rel).is_file():
            problems.append(f"{t} {_line(i)}: slide file not found: {rel}")
    return problems


def _check_genomics(df: pd.DataFrame, spec: CohortSpec, patients: pd.DataFrame | None) -> list[str]:
    t = spec.tables.genomics or "genomics"
    problems = _missing_columns(df, ["patient_id"], t)
    if problems:
        return problems
    problems += _duplicates(df, "patient_id", t)
    if spec.genomics != "all":
        problems += [f"{t}: missing gene column '{c}' (listed in {COHORT_FILE})"
                     for c in spec.genomics if c not in df.columns]
    known = set(patients["patient_id"]) if patients is not None and "patient_id" in patients else None
    for i, pid in enumerate(df["patient_id"]):
        if known is not None and pid not in known:
            problems.append(f"{t} {_line(i)}: patient_id '{pid}' is not in {spec.tables.patients}")
    for col in df.columns:
        if col == "patient_id":
            continue
        values = pd.to_numeric(df[col], errors="coerce")
        for i in np.flatnonzero(values.isna() & df[col].notna())[:5]:
            problems.append(f"{t} {_line(i)}: gene '{col}' is not a number ('{df[col].iat[i]}')")
    return problems
