"""Scheduled scoring: new patients dropped into an inbox folder join a scoring cohort, are scored
with a trained model's fold ensemble, and leave the inbox (no Prefect here; see flows/scoring.py).

The inbox is a cohort folder (same format: slide files, `slides.csv`, `patients.csv`, optional
`genomics.csv`; its `cohort.yaml` is copied from the training cohort when missing). Its slide paths
must stay inside it, whatever the training cohort allows. Every step can be repeated, so a crash at
any point is repaired by the next run:

1. intake: the inbox is validated; a patient whose rows have a problem moves to `INBOX/failed/`
   with the reason; the other new patients' files are copied into the scoring cohort and the
   scoring tables rewritten (atomically). The inbox keeps everything.
2. the flow tiles, encodes and scores every patient of the scoring cohort without a prediction,
   and writes their reports; a patient who cannot be scored or reported is taken back out of the
   scoring cohort and moved to `INBOX/failed/` with the reason.
3. release: inbox patients whose prediction (and report) are durably written leave the inbox.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shutil
from pathlib import Path

import pandas as pd

from fusion.cohort import COHORT_FILE, Cohort, CohortSpec, load_cohort, load_spec, read_table
from fusion.errors import CohortError
from fusion.run import RunLayout
from fusion.storage import Ledger, atomic_path, file_fingerprint, read_json, sweep_partials, write_table, write_text

FAILED = "failed"  # INBOX/failed/<batch>/: the rows and files of patients that failed, and reason.txt
_ROLES = ("slides", "patients", "genomics")
_PROBLEM_LINE = re.compile(r"^(?P<table>[^:]+?) line (?P<line>\d+): ")
_SAFE_SUFFIX = re.compile(r"(\.[A-Za-z0-9]{1,8}){0,3}")


@dataclasses.dataclass
class Intake:
    """What intake did: patients that came in, patients refused (id -> reason; they moved to
    INBOX/failed/<batch>/), among them those scored before (`scored_before`), and warnings (id -> text)."""

    arrived: list[str]
    failed: dict[str, str]
    scored_before: dict[str, str] = dataclasses.field(default_factory=dict)
    warnings: dict[str, str] = dataclasses.field(default_factory=dict)


def intake_inbox(inbox: str | Path, cohort_dir: str | Path, template: str | Path, batch: str = "intake",
                 released: dict[str, str] | None = None) -> Intake:
    """Copy the inbox's new, valid patients into the scoring cohort at `cohort_dir`.

    Patients whose rows have a problem move to INBOX/failed/<batch>/ with the reason, and so does a
    patient scored and released by an earlier batch (`released`: id -> batch) that is dropped in
    again: a patient is scored once, and its earlier score is not silently kept or replaced. A
    patient id that is also a patient of the training cohort (`template`) is taken in with a
    warning. A problem of the inbox as a whole (no such folder, a missing column, an unreadable
    table) raises `CohortError` and moves nothing.
    """
    inbox, cohort_dir = Path(inbox).resolve(), Path(cohort_dir)
    if not inbox.is_dir():
        raise CohortError(str(inbox), ["the inbox folder does not exist; create it (see `serve.inbox` in the config)"])
    spec = load_spec(Path(template))
    sweep_partials(cohort_dir)  # slide copies half-written by a killed night
    if not _has_rows(inbox, spec):
        return Intake([], {})
    if not (inbox / COHORT_FILE).exists():
        write_text(inbox / COHORT_FILE, (Path(template) / COHORT_FILE).read_text())
    failed: dict[str, str] = {}
    incoming = _load_inbox(inbox, spec, batch, failed)
    if incoming is None:
        return Intake([], failed)
    again = _scored_before(incoming, released or {})
    if again:
        move_to_failed(inbox, again, batch)
        failed.update(again)
        if not _has_rows(inbox, spec):
            return Intake([], failed, again)
        incoming = load_cohort(inbox, external_paths=False)
    if not (cohort_dir / COHORT_FILE).exists():
        write_text(cohort_dir / COHORT_FILE, (inbox / COHORT_FILE).read_text())
    current = _tables(cohort_dir, incoming.spec)
    new_slides = incoming.slides[~incoming.slides.slide_id.isin(current["slides"].get("slide_id", []))]
    new_patients = incoming.patients[~incoming.patients.patient_id.isin(current["patients"].get("patient_id", []))]
    arrived = sorted(set(new_slides.patient_id) | set(new_patients.patient_id))

    copied = []
    for row in new_slides.itertuples():  # files first, tables second: a crash in between leaves only spare files
        target = cohort_dir / "slides" / f"{row.slide_id}{_suffix(row.path)}"
        if not target.exists():
            with atomic_path(target) as tmp:
                shutil.copyfile(row.path, tmp)
        copied.append({"slide_id": row.slide_id, "patient_id": row.patient_id,
                       "path": str(target.relative_to(cohort_dir))})
    raw = _tables(inbox, incoming.spec)  # the inbox rows as the user wrote them
    write_table(cohort_dir / incoming.spec.tables.slides, pd.concat([current["slides"], pd.DataFrame(copied)]))
    for role in ("patients", "genomics"):
        if role in raw:
            rows = raw[role][raw[role].patient_id.isin(new_patients.patient_id)]
            write_table(cohort_dir / getattr(incoming.spec.tables, role),
                        pd.concat([current.get(role, pd.DataFrame()), rows]))
    return Intake(arrived, failed, again, _training_ids(template, arrived))


def _has_rows(inbox: Path, spec: CohortSpec) -> bool:
    """Whether any inbox table has a row (an empty inbox has none; slide rows without a patients
    table are not empty: validation names what is wrong with them)."""
    for role in _ROLES:
        name = getattr(spec.tables, role)
        if name and (inbox / name).is_file() and not read_table(inbox / name).empty:
            return True
    return False


def _scored_before(incoming: Cohort, released: dict[str, str]) -> dict[str, str]:
    """Inbox patients scored and released by an earlier batch: id -> why they are refused."""
    return {pid: f"already scored (batch {released[pid]}) and released from the inbox; a patient is scored once, so "
                 f"this copy was refused: to score new material for this patient, give it a new patient id "
                 f"(e.g. {pid}-2)" for pid in incoming.patients.patient_id if pid in released}


def _training_ids(template: str | Path, patient_ids: list[str]) -> dict[str, str]:
    """A warning per patient id that is also a patient of the training cohort."""
    template = Path(template)
    try:
        training = set(read_table(template / load_spec(template).tables.patients).patient_id.astype(str))
    except (CohortError, ValueError, OSError, AttributeError):  # the template's own problems are not the inbox's
        return {}
    return {pid: f"patient id {pid} is also a patient of the training cohort {template}: if it is the same patient, "
                 "the model saw it in training and its score is optimistic; if not, give new patients ids of their "
                 "own (e.g. `fusion synth --id-prefix N`)" for pid in patient_ids if pid in training}


def trained_on(model_dir: str | Path, patient_ids) -> list[str]:
    """The patients among `patient_ids` that the model was trained on (its cross-validated predictions
    name every training patient): their scores come from a model that saw them."""
    path = Path(model_dir) / "predictions.parquet"
    if not path.exists():
        return []
    seen = set(pd.read_parquet(path, columns=["patient_id"]).patient_id.astype(str))
    return [str(p) for p in patient_ids if str(p) in seen]


def released_patients(ledger: Ledger) -> dict[str, str]:
    """Patients that earlier batches scored and released from the inbox: id -> batch (from the ledger)."""
    out: dict[str, str] = {}
    for e in ledger.entries():
        if e.get("step") != "serve":
            continue
        if e.get("status") == "released":
            out[str(e["item"])] = str(e.get("batch", ""))
        elif e.get("status") == "done":  # batches before per-patient lines listed them in one line
            out.update({str(pid): str(e["item"]) for pid in e.get("released") or []})
    return out


def _load_inbox(inbox: Path, template_spec: CohortSpec, batch: str, failed: dict[str, str]) -> Cohort | None:
    """The inbox as a cohort once the patients with row problems have moved to failed/ (None if none is left)."""
    for _ in range(2):  # problems are found all at once: one pass moves them, the second must be clean
        try:
            return load_cohort(inbox, external_paths=False)
        except CohortError as e:
            rows = _problem_rows(e, inbox)
            if rows is None:
                raise
            reasons: dict[str, list[str]] = {}
            for _, _, pid, problem in rows:
                reasons.setdefault(pid, []).append(problem)
            joined = {pid: "; ".join(r) for pid, r in reasons.items()}
            bad: dict[str, set[int]] = {}
            for role, row, _, _ in rows:
                bad.setdefault(role, set()).add(row)
            move_to_failed(inbox, joined, batch, bad)
            failed.update(joined)
            if read_table(inbox / template_spec.tables.patients).empty:
                return None
    return load_cohort(inbox, external_paths=False)


def _problem_rows(error: CohortError, inbox: Path) -> list[tuple[str, int, str, str]] | None:
    """(table role, row, patient id, problem) for each problem of a table row; None when any problem
    is not a row's (a missing column, a table that cannot be read): the inbox as a whole is at fault."""
    try:
        spec = load_spec(inbox)
    except CohortError:
        return None
    names = {getattr(spec.tables, role): role for role in _ROLES if getattr(spec.tables, role)}
    raw = _tables(inbox, spec)
    out = []
    for problem in error.problems:
        match = _PROBLEM_LINE.match(problem)
        role = names.get(match["table"]) if match else None
        if role is None or role not in raw or "patient_id" not in raw[role].columns:
            return None
        row = int(match["line"]) - 2
        pid = raw[role].patient_id.iat[row]
        out.append((role, row, "(blank id)" if pd.isna(pid) else str(pid), problem))
    return out


def move_to_failed(inbox: str | Path, reasons: dict[str, str], batch: str,
                   rows: dict[str, set[int]] | None = None) -> Path | None:
    """Move the inbox rows and slide files of these patients (and any `rows` by table role and
    position) to INBOX/failed/<batch>/, with reason.txt. Only files inside the inbox move; the rows
    keep their paths as written. Returns the folder."""
    if not reasons:
        return None
    inbox = Path(inbox).resolve()
    spec = load_spec(inbox)
    target = inbox / FAILED / batch
    raw = _tables(inbox, spec)
    ids = set(reasons)
    for role, table in raw.items():
        if "patient_id" not in table.columns:
            continue
        gone = table.patient_id.isin(ids).to_numpy()
        gone[[i for i in (rows or {}).get(role, ()) if i < len(table)]] = True
        if role == "slides" and "path" in table.columns:
            for rel in table.path[gone].dropna():
                _move_inside(inbox, str(rel), target)
        name = getattr(spec.tables, role)
        if gone.any():
            old = read_table(target / name) if (target / name).exists() else pd.DataFrame()
            write_table(target / name, pd.concat([old, table[gone]]))  # the failed copy first, then the inbox forgets
        write_table(inbox / name, table[~gone])
    lines = [f"{pid}: {why}" for pid, why in sorted(reasons.items())]
    old = (target / "reason.txt").read_text() if (target / "reason.txt").exists() else ""
    write_text(target / "reason.txt", old + "\n".join(lines) + "\n")
    return target


def _move_inside(inbox: Path, rel: str, target: Path) -> None:
    """Move inbox/<rel> to target/<rel> when it is a file inside the inbox (never anything else)."""
    try:
        source = (inbox / rel).resolve()
    except (OSError, ValueError):
        return
    if not source.is_relative_to(inbox) or not source.is_file() or source.is_relative_to(inbox / FAILED):
        return
    dest = target / source.relative_to(inbox)
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(source, dest)


def release_inbox(inbox: str | Path, done: set[str], ledger: Ledger | None = None, batch: str = "") -> list[str]:
    """Remove from the inbox the patients whose results are durably written: rows first, then the
    slide files inside the inbox (a crash in between leaves only spare files). Returns their ids.

    Each release is written to `ledger` first, so a patient dropped in again later is known to have
    been scored (`released_patients`) rather than taken for the leftover of a night that crashed.
    """
    inbox = Path(inbox).resolve()
    if not done or not (inbox / COHORT_FILE).exists():
        return []
    spec = load_spec(inbox)
    raw = _tables(inbox, spec)
    if "patient_id" not in raw["patients"].columns:
        return []
    leaving = sorted(set(raw["patients"].patient_id) & done)
    for pid in leaving if ledger is not None else []:
        ledger.record("serve", pid, "released", batch=batch)
    files = []
    if {"patient_id", "path"} <= set(raw["slides"].columns):
        files = list(raw["slides"][raw["slides"].patient_id.isin(leaving)].path.dropna())
    for role, table in raw.items():
        if "patient_id" in table.columns:
            write_table(inbox / getattr(spec.tables, role), table[~table.patient_id.isin(leaving)])
    for rel in files:
        source = (inbox / str(rel)).resolve()
        if source.is_relative_to(inbox) and not source.is_relative_to(inbox / FAILED):
            source.unlink(missing_ok=True)
    return leaving


def retract(cohort_dir: str | Path, layout: RunLayout, model: str, patient_ids: set[str]) -> None:
    """Take patients back out of the scoring cohort: rows, copied slide files, prediction rows, reports."""
    cohort_dir = Path(cohort_dir)
    if not patient_ids or not (cohort_dir / COHORT_FILE).exists():
        return
    spec = load_spec(cohort_dir)
    raw = _tables(cohort_dir, spec)
    for rel in raw["slides"][raw["slides"].patient_id.isin(patient_ids)].path if len(raw["slides"]) else []:
        path = (cohort_dir / str(rel)).resolve()
        if path.is_relative_to(cohort_dir.resolve()):
            path.unlink(missing_ok=True)
    for role, table in raw.items():
        if "patient_id" in table.columns:
            write_table(cohort_dir / getattr(spec.tables, role), table[~table.patient_id.isin(patient_ids)])
    path = predictions_path(layout, model)
    if path.exists():
        scores = pd.read_parquet(path)
        write_table(path, scores[~scores.patient_id.isin(patient_ids)], durable=True)
    for pid in patient_ids:
        for suffix in (".html", ".pdf"):
            with contextlib.suppress(ValueError):  # an id that cannot be a file name has no report
                layout.report_path(pid, suffix).unlink(missing_ok=True)


def _suffix(path: str) -> str:
    """The slide file's extension(s) (`.svs`, `.ome.tiff`), kept for the readers that go by it."""
    for suffix in ("".join(Path(path).suffixes[-3:]), Path(path).suffix):
        if _SAFE_SUFFIX.fullmatch(suffix):
            return suffix
    return ""


def _tables(folder: Path, spec) -> dict[str, pd.DataFrame]:
    out = {}
    for role in _ROLES:
        name = getattr(spec.tables, role)
        if name and (folder / name).exists():
            out[role] = read_table(folder / name)
        elif role != "genomics":
            out[role] = pd.DataFrame()
    return out


def unscored(layout: RunLayout, cohort: Cohort, model: str) -> list[str]:
    """Patients of the scoring cohort without a stored prediction from `model`."""
    done = scored(layout, model)
    return [p for p in cohort.patients.patient_id if p not in done]


def scored(layout: RunLayout, model: str) -> set[str]:
    """Patients with a stored prediction from `model`."""
    path = predictions_path(layout, model)
    return set(pd.read_parquet(path, columns=["patient_id"]).patient_id) if path.exists() else set()


def predictions_path(layout: RunLayout, model: str) -> Path:
    return layout.inside(layout.root / "predictions" / f"{model}.parquet")


def subset_cohort(cohort: Cohort, patient_ids: list[str]) -> Cohort:
    """The same cohort restricted to `patient_ids` (for scoring a batch)."""
    keep = set(patient_ids)
    genomics = None if cohort.genomics is None else cohort.genomics[cohort.genomics.index.isin(keep)]
    return dataclasses.replace(cohort, patients=cohort.patients[cohort.patients.patient_id.isin(keep)],
                               slides=cohort.slides[cohort.slides.patient_id.isin(keep)].reset_index(drop=True),
                               genomics=genomics)


def merge_predictions(layout: RunLayout, model: str, scores: pd.DataFrame, batch: str) -> Path:
    """Add a batch's scores to RUN/predictions/<model>.parquet (a patient scored again replaces its row);
    flushed to the disk before it returns, since the inbox forgets these patients next."""
    path = predictions_path(layout, model)
    scores = scores.assign(batch=batch)
    if path.exists():
        old = pd.read_parquet(path)
        scores = pd.concat([old[~old.patient_id.isin(scores.patient_id)], scores], ignore_index=True)
    write_table(path, scores, durable=True)
    return path


def share_encoders(training: RunLayout, scoring: RunLayout, encoder: str) -> list[str]:
    """Copy into the scoring run each encoder of `encoder` ('morph+mocov3') that the training run
    pretrained (RUN/encoders/<name>), so that new patients are encoded by the weights the model was
    trained on; an encoder already there with the same weights is kept. Returns the names copied."""
    copied = []
    for name in encoder.split("+"):
        source, target = training.encoder_dir(name), scoring.encoder_dir(name)
        weights = source / "model.safetensors"
        if not (source / "config.json").exists() or not weights.exists():
            continue  # a registered encoder (morph, timm, a foundation model): nothing to share
        if (target / "model.safetensors").exists() and \
                file_fingerprint(target / "model.safetensors") == file_fingerprint(weights):
            continue
        partial = target.with_name(target.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(source, partial)
        shutil.rmtree(target, ignore_errors=True)
        partial.rename(target)
        copied.append(name)
    return copied


def model_encoder(model_dir: str | Path) -> tuple[str, str]:
    """(encoder, tile set) a trained model's features came from, read from its first fold's config."""
    config = read_json(Path(model_dir) / "fold-0" / "config.json")
    return config["encoder"], config.get("train_config", {}).get("tile_set", "")


__all__ = ["intake_inbox", "Intake", "released_patients", "trained_on", "move_to_failed", "release_inbox", "retract",
           "unscored", "scored", "subset_cohort", "merge_predictions", "model_encoder", "predictions_path",
           "share_encoders"]
