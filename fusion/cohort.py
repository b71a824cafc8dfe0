"""Cohort folder: `cohort.yaml` + slides / patients / genomics tables, loaded and validated.

Validation collects every problem (file, line, column, what is wrong) and raises one
`CohortError` listing them all, so a user fixes a table in one pass instead of one error a run.
Line numbers are the lines of the file as a spreadsheet or editor shows them: the header is
line 1, the first patient line 2.

Ids are data, never paths: a patient or slide id becomes part of file names (tiles, features,
reports), so it must match `ID_PATTERN` (letters, digits, `.`, `_`, `-`; it starts with a letter
or digit; at most 128 characters; no `..`). A slide file that is missing is not a cohort
problem but that slide's own failure (`Cohort.missing_slides`), so one lost file does not stop
the cohort; `strict=True` makes it one.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fusion.errors import CohortError

COHORT_FILE = "cohort.yaml"
ID_MAX = 128
ID_PATTERN = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._-]{{0,{ID_MAX - 1}}}")
ID_RULE = (f"ids are 1-{ID_MAX} letters, digits, '.', '_' or '-', starting with a letter or digit, "
           "without '..' (they become file names)")


def id_problem(value: object) -> str | None:
    """Why `value` cannot be a patient or slide id (it becomes a file name), or None when it can."""
    text = str(value)
    if not ID_PATTERN.fullmatch(text):
        return f"'{_shown(text)}' is not a valid id: {ID_RULE}"
    if ".." in text:
        return f"'{_shown(text)}' is not a valid id: it contains '..'"
    return None


def check_id(value: object, what: str = "id") -> str:
    """`value` as a string when it is a valid id, else a ValueError naming it and the rule."""
    problem = id_problem(value)
    if problem:
        raise ValueError(f"{what} {problem}")
    return str(value)


def _shown(text: str, limit: int = 60) -> str:
    """A value as it may be printed in one error line: control characters escaped, long ones cut."""
    text = text.encode("unicode_escape").decode("ascii")
    return text if len(text) <= limit else text[:limit] + "..."


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
    # slide_id -> why the slide's file cannot be used (not found); each is that slide's failure
    missing_slides: dict[str, str] = dataclasses.field(default_factory=dict)

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
    """Read CSV (UTF-8, with or without a byte-order mark) or Parquet by extension; ids are kept as strings.

    A file that cannot be read raises ValueError with a hint: `;`-separated or tab-separated
    text, UTF-16 (Excel's "Unicode text"), bytes that are not UTF-8, a truncated Parquet file.
    """
    if path.suffix.lower() in {".parquet", ".pq"}:
        try:
            df = pd.read_parquet(path)
        except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a damaged file
            raise ValueError(f"not a readable Parquet file ({_first_line(e)}); write it again, or use CSV") from None
    else:
        df = _read_csv(path)
    for col in ("patient_id", "slide_id"):
        if col in df.columns:
            df[col] = df[col].astype("string").str.strip().astype(object)
    return df


def _read_csv(path: Path) -> pd.DataFrame:
    with path.open("rb") as f:
        head = f.read(4)
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise ValueError("the file is UTF-16 text (Excel's 'Unicode text'); save it as 'CSV UTF-8 (comma delimited)'")
    try:
        df = pd.read_csv(path, dtype={"patient_id": str, "slide_id": str}, encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); "
                         "save it as 'CSV UTF-8 (comma delimited)'") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise ValueError(f"not a valid CSV table ({_first_line(e)})") from None
    if len(df.columns) == 1:
        header = str(df.columns[0])
        for sep, name in ((";", "semicolons"), ("\t", "tabs")):
            if sep in header:
                raise ValueError(f"its columns are separated by {name}, not commas (header '{_shown(header)}'); "
                                 "save it as comma-separated CSV (in Excel: 'CSV UTF-8 (comma delimited)')")
    return df


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return _shown(text[0] if text else type(e).__name__, 160)


def load_spec(root: Path) -> CohortSpec:
    """The validated `cohort.yaml` of `root`; a missing folder or file names the closest one that exists."""
    path = root / COHORT_FILE
    if not root.is_dir():
        raise CohortError(str(root), [f"the folder does not exist{folder_hint(root, COHORT_FILE)}"])
    if not path.is_file():
        inside = sorted(p.name for p in root.iterdir() if (p / COHORT_FILE).is_file())
        hint = f" (did you mean {root / inside[0]}?)" if len(inside) == 1 else ""
        raise CohortError(str(root), [f"{COHORT_FILE} not found in {root}{hint}"])
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8-sig")) or {}
        if not isinstance(raw, dict):
            raise CohortError(str(path), ["expected a mapping of settings (see data/README.md)"])
        return CohortSpec.model_validate(raw)
    except UnicodeDecodeError:
        raise CohortError(str(path), ["not UTF-8 text; save it as UTF-8"]) from None
    except yaml.YAMLError as e:
        raise CohortError(str(path), [f"not valid YAML: {_shown(str(e), 200)}"]) from None
    except ValidationError as e:
        raise CohortError(str(path), [_spec_problem(err) for err in e.errors()]) from None


def did_you_mean(word: str, candidates, what: str = "") -> str:
    """' (did you mean 'x'?)' naming the candidate closest to a mistyped `word`, or '' when none is close."""
    close = difflib.get_close_matches(str(word), [str(c) for c in candidates], n=1, cutoff=0.6)
    return f" (did you mean {what}'{close[0]}'?)" if close else ""


def folder_hint(folder: Path, marker: str | None = None) -> str:
    """' (did you mean /x/cohort?)' for a mistyped folder whose parent holds a folder of a close name
    (one holding `marker`, when given); '' when there is none."""
    parent = Path(folder).parent
    if not parent.is_dir():
        return ""
    names = [p.name for p in parent.iterdir() if p.is_dir() and (marker is None or (p / marker).is_file())]
    close = difflib.get_close_matches(Path(folder).name, names, n=1, cutoff=0.6)
    return f" (did you mean {parent / close[0]}?)" if close else ""


# The settings each section of cohort.yaml takes, to name the closest one to a mistyped key.
_SECTIONS = {(): CohortSpec, ("tables",): Tables, ("outcome",): Outcome, ("intended_use",): IntendedUse}


def _spec_problem(err: dict) -> str:
    loc = tuple(map(str, err["loc"]))
    problem = f"{'.'.join(loc)}: {err['msg']}"
    section = _SECTIONS.get(loc[:-1])
    if err["type"] == "extra_forbidden" and section is not None:
        problem += did_you_mean(loc[-1], section.model_fields)
    return problem


def load_cohort(root: str | Path, *, check_files: bool = True, strict: bool = False,
                external_paths: bool | None = None) -> Cohort:
    """Load and validate a cohort folder; raise `CohortError` listing every problem.

    With `check_files`, slide files that do not exist are listed in `Cohort.missing_slides` (each
    is that slide's failure); with `strict` they are problems too. `external_paths=False` refuses
    slide paths outside the folder whatever `cohort.yaml` allows (an inbox of files from elsewhere).
    """
    root = Path(root).resolve()
    spec = load_spec(root)
    if external_paths is not None:
        spec = spec.model_copy(update={"allow_external_paths": external_paths})
    problems: list[str] = []
    tables = {role: _load_table(root, spec, role, problems) for role in ("slides", "patients", "genomics")}
    patients, slides, genomics = tables["patients"], tables["slides"], tables["genomics"]
    if patients is not None:
        problems += _check_patients(patients, spec)
    missing: dict[str, str] = {}
    if slides is not None:
        problems += _check_slides(slides, spec, root, patients, missing if check_files else None)
        if strict:
            problems += list(missing.values())
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
    return Cohort(root, spec, slides.reset_index(drop=True), patients, genomics, missing)


def _load_table(root: Path, spec: CohortSpec, role: str, problems: list[str]) -> pd.DataFrame | None:
    """The table named as `tables.<role>`, or None with the reason appended to `problems`."""
    name = getattr(spec.tables, role)
    if name is None:
        return None
    path = root / name
    if not path.resolve().is_relative_to(root):
        problems.append(f"{COHORT_FILE}: tables.{role} '{_shown(name)}' leaves the cohort folder; keep it inside")
        return None
    if not path.is_file():
        problems.append(f"{name}: file not found (named as tables.{role} in {COHORT_FILE})")
        return None
    try:
        return read_table(path)
    except (ValueError, OSError) as e:
        problems.append(f"{name}: cannot be read: {e}")
        return None


def _line(i: int) -> str:
    return f"line {i + 2}"  # header is line 1


def _missing_columns(df: pd.DataFrame, needed: list[str] | dict[str, str], table: str) -> list[str]:
    """A problem per needed column the table lacks; `needed` may map each column to the cohort.yaml
    setting that names it. Each names the table's closest column, for a typo on either side."""
    origin = needed if isinstance(needed, dict) else {}
    present = [str(c) for c in df.columns]
    problems = []
    for c in needed:
        if c in df.columns:
            continue
        named = f" (named by {origin[c]} in {COHORT_FILE})" if origin.get(c) else ""
        problems.append(f"{table}: missing column '{c}'{named}{did_you_mean(c, present)}")
    return problems


def _duplicates(df: pd.DataFrame, col: str, table: str) -> list[str]:
    dup = df[col].duplicated(keep="first") & df[col].notna()
    return [f"{table} {_line(i)}: duplicate {col} '{df[col].iat[i]}'" for i in np.flatnonzero(dup)]


def _blank_ids(df: pd.DataFrame, col: str, table: str) -> list[str]:
    blank = df[col].isna() | (df[col].astype(str).str.len() == 0)
    return [f"{table} {_line(i)}: empty {col}" for i in np.flatnonzero(blank)]


def _bad_ids(df: pd.DataFrame, col: str, table: str) -> list[str]:
    """Ids that cannot be file names, and ids equal but for case (one file on macOS or Windows)."""
    problems = []
    seen: dict[str, int] = {}
    for i, value in enumerate(df[col]):
        if pd.isna(value) or value == "":
            continue
        problem = id_problem(value)
        if problem:
            problems.append(f"{table} {_line(i)}: {col} {problem}")
            continue
        first = seen.setdefault(str(value).lower(), i)
        if first != i and df[col].iat[first] != value:
            problems.append(f"{table} {_line(i)}: {col} '{value}' differs from '{df[col].iat[first]}' "
                            f"({_line(first)}) only by case; their files would clash on some systems")
    return problems


def _check_patients(df: pd.DataFrame, spec: CohortSpec) -> list[str]:
    t = spec.tables.patients
    time_col, event_col = spec.outcome.time, spec.outcome.event
    needed = {"patient_id": "", time_col: "outcome.time", event_col: "outcome.event",
              **{c: "clinical" for c in spec.clinical}}
    if spec.label:
        needed[spec.label] = "label"
    problems = _missing_columns(df, needed, t)
    if "patient_id" in df.columns:
        problems += _blank_ids(df, "patient_id", t) + _bad_ids(df, "patient_id", t) + _duplicates(df, "patient_id", t)
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
    df: pd.DataFrame, spec: CohortSpec, root: Path, patients: pd.DataFrame | None, missing: dict[str, str] | None
) -> list[str]:
    """Problems of the slides table; slide files not found go into `missing` (when given), not problems."""
    t = spec.tables.slides
    problems = _missing_columns(df, ["slide_id", "patient_id", "path"], t)
    if problems:
        return problems
    problems += _blank_ids(df, "slide_id", t) + _bad_ids(df, "slide_id", t) + _duplicates(df, "slide_id", t)
    known = set(patients["patient_id"]) if patients is not None and "patient_id" in patients else None
    for i, (sid, pid, rel) in enumerate(zip(df["slide_id"], df["patient_id"], df["path"], strict=True)):
        if known is not None and pid not in known:
            problems.append(f"{t} {_line(i)}: patient_id '{_shown(str(pid))}' is not in {spec.tables.patients}")
        if not isinstance(rel, str) or not rel.strip():
            problems.append(f"{t} {_line(i)}: empty path")
            continue
        try:
            target = (root / rel).resolve()
        except (OSError, ValueError) as e:  # e.g. a NUL byte in the path
            problems.append(f"{t} {_line(i)}: path '{_shown(rel)}' is not a usable path ({e})")
            continue
        if not spec.allow_external_paths and not target.is_relative_to(root):
            problems.append(f"{t} {_line(i)}: path '{_shown(rel)}' leaves the cohort folder; move the slide inside it "
                            f"or set `allow_external_paths: true` in {COHORT_FILE}")
        elif missing is not None and not target.is_file():
            missing[str(sid)] = f"{t} {_line(i)}: slide file not found: {_shown(rel)}"
    return problems


def _check_genomics(df: pd.DataFrame, spec: CohortSpec, patients: pd.DataFrame | None) -> list[str]:
    t = spec.tables.genomics or "genomics"
    problems = _missing_columns(df, ["patient_id"], t)
    if problems:
        return problems
    problems += _duplicates(df, "patient_id", t)
    if spec.genomics != "all":
        problems += [f"{t}: missing gene column '{c}' (listed in {COHORT_FILE}){did_you_mean(c, df.columns)}"
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
