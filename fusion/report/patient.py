"""`fusion report`: one self-contained HTML page (and a PDF) per patient, for the clinician.

The first A4 page is the summary a tumour board reads: the risk group with the cut it was placed by,
the percentile among the training cohort, the absolute risk of the event by stated horizons with a
95% interval and whether those risks are calibrated, what the model read and what was missing,
warnings (data quality, inputs unlike the training cohort), the intended use, and a sign-off block.
The pages after it hold the detail: the predicted survival curve, the slides with where the model
looked, what moved the risk, the class prediction and the model card.

A report holds that patient's data alone: the cohort appears only as aggregate Kaplan-Meier curves
and cross-validated metrics. A patient of the training cohort is scored and explained by the fold
model that never trained on them; a new patient by every fold model (percentiles averaged, never raw
risks). Every sentence about inputs is derived from what the model declares it reads.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from fusion import __version__
from fusion.cohort import Cohort, CohortSpec, load_spec
from fusion.errors import RunError
from fusion.report import patient_sections as sections
from fusion.report import plots, stats
from fusion.report.explain import FoldExplanation, explain_patient
from fusion.report.html import data_uri, render
from fusion.report.patient_risk import absolute_risk, risk_group
from fusion.report.signing import note_new_draft, sign_off_block, signed_versions
from fusion.report.tripod import median_follow_up
from fusion.run import RUN_FILE, RunLayout
from fusion.storage import write_text
from fusion.survival.calibration import Recalibration, cross_fitted_risk, fit_recalibration
from fusion.survival.crossval import OutOfFold, fold_mean_c, load_out_of_fold, percentile_of, training_percentile
from fusion.survival.horizons import report_horizons
from fusion.train.checkpoint import fold_dirs, load_checkpoint
from fusion.train.data import Bags, Preprocessor, load_bags
from fusion.train.loop import model_inputs


@dataclass
class Fold:
    model: object
    config: dict
    metrics: dict
    prep: Preprocessor

    @property
    def discrete(self) -> bool:
        return self.config.get("bin_edges") is not None

    @property
    def percentiles(self) -> list[float] | None:
        return (self.metrics.get("train_risk_cutoffs") or {}).get("percentiles")


@dataclass
class TrainedModel:
    """Every fold of a cross-validated model with what a report needs to read its outputs."""

    directory: Path
    folds: list[Fold]
    oof: pd.DataFrame | None  # out-of-fold predictions of the training cohort
    cv: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.directory.name

    @property
    def config(self) -> dict:
        return self.folds[0].config

    @property
    def classify(self) -> bool:
        return self.config["train_config"].get("task") == "classification"

    @property
    def inputs(self) -> tuple[str, ...]:
        return model_inputs(self.config["model"])


def load_trained(directory: Path) -> TrainedModel:
    """Every fold of a model, in fold order and checked against its training manifest (`fold_dirs`)."""
    folds = []
    for folder in fold_dirs(directory):
        model, config = load_checkpoint(folder)
        metrics_path = folder / "metrics.json"
        metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
        folds.append(Fold(model, config, metrics, Preprocessor.from_state(config["preprocessor"])))
    oof_path = directory / "predictions.parquet"
    cv_path = directory / "cv_metrics.json"
    return TrainedModel(directory, folds, pd.read_parquet(oof_path) if oof_path.exists() else None,
                        json.loads(cv_path.read_text()) if cv_path.exists() else {})


def write_reports(layout: RunLayout, cohort: Cohort, model: str | Path, patient_ids: list[str] | None = None,
                  out_dir: str | Path | None = None, pdf: bool = True, groups: str = "median", n_top: int = 6,
                  on_report: Callable[[str], None] | None = None, horizons: list[float] | None = None) -> list[Path]:
    """Write `reports/<patient_id>.html` (+ `.pdf`) for the patients named (default: every patient
    of the cohort). `model` is a model name of this run or a model folder of another run; `horizons`
    (in the cohort's time unit) override the default 1, 3 and 5 years inside the training follow-up."""
    model_dir = Path(model) if Path(model).is_dir() else layout.model_dir(str(model))
    trained = load_trained(model_dir)
    if trained.classify:
        raise RunError(f"{model_dir.name} is a classification model; give the survival model "
                       f"(its '-classification' sibling is picked up by itself)")
    classifier_dir = model_dir.parent / f"{model_dir.name}-classification"
    classifier = load_trained(classifier_dir) if (classifier_dir / "fold-0" / "model.safetensors").exists() else None
    context = ReportContext.build(layout, cohort, trained, classifier, groups, horizons)
    ids = list(cohort.patients["patient_id"]) if patient_ids is None else list(patient_ids)
    unknown = [p for p in ids if p not in context.index]
    if unknown:
        raise RunError(f"patient(s) not in the cohort {cohort.root}: {', '.join(unknown[:10])}"
                       + (f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""))
    out = Path(out_dir) if out_dir else layout.reports
    written = []
    with one_torch_thread():  # one patient's forward passes are tiny: thread hand-offs would dominate
        for pid in ids:
            html = context.render(pid, n_top, signed_versions(out, pid))
            written.append(write_text(out / f"{pid}.html", html))
            note_new_draft(out, pid, written[-1])
            if on_report:
                on_report(pid)
    if pdf:
        from fusion.report.pdf import print_pdfs

        written += print_pdfs(written)
    return written


@contextmanager
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def training_spec(trained: TrainedModel) -> CohortSpec | None:
    """cohort.yaml of the cohort the model was trained on (its intended use), when still readable."""
    try:
        cohort_dir = json.loads((trained.directory.parent.parent / RUN_FILE).read_text())["cohort"]
        return load_spec(Path(cohort_dir))
    except (OSError, ValueError, KeyError):
        return None


@dataclass
class ReportContext:
    """What every report of one model and run shares, computed once."""

    layout: RunLayout
    cohort: Cohort
    trained: TrainedModel
    classifier: TrainedModel | None
    groups: str
    bags: Bags
    tabs: list[dict[str, np.ndarray]]  # per fold, preprocessed tabular data of every patient
    class_tabs: list[dict[str, np.ndarray]]
    index: dict[str, int]
    reference_km: dict
    same_run: bool
    ledger_failures: dict[str, str]
    recal: Recalibration
    horizons: list[float]  # where the report states absolute risk
    grid: np.ndarray  # time points of the predicted survival curve
    training: dict  # the training cohort and the model's cross-validated performance
    spec: CohortSpec  # the training cohort's cohort.yaml (intended use, time unit)

    @classmethod
    def build(cls, layout: RunLayout, cohort: Cohort, trained: TrainedModel, classifier: TrainedModel | None,
              groups: str, horizons: list[float] | None = None) -> ReportContext:
        train = trained.config["train_config"]
        bags, _ = load_bags(layout, cohort, trained.config["encoder"], train.get("tile_set", ""),
                            keep_without_tiles=True)
        tabs = [f.prep.transform(bags) for f in trained.folds]
        class_tabs = [f.prep.transform(bags) for f in classifier.folds] if classifier else []
        same_run = trained.directory.resolve().parent.parent == layout.root.resolve()
        if trained.oof is None or not len(trained.oof):
            raise RunError(f"{trained.directory} has no out-of-fold predictions: the cohort reference is missing")
        oof = load_out_of_fold(trained.directory)
        if not oof.has_cutoffs:
            raise RunError(f"{trained.directory} was trained before folds stored their training risks: "
                           "risk groups cannot be placed without looking at the test folds; retrain it")
        spec = training_spec(trained) or cohort.spec
        reference_km = stats.kaplan_meier(oof.preds["time"], oof.preds["event"],
                                          stats.risk_groups(training_percentile(oof), groups))
        chosen = report_horizons(stats.usable_times(oof.preds["time"], oof.preds["event"], oof.common_horizons),
                                 spec.time_unit, horizons)
        grid = np.round(np.linspace(0, max(chosen) * 1.25, 61), 6)
        recal = fit_recalibration(oof, sorted({*grid.tolist(), *chosen}), n_boot=200)
        training = _training_summary(trained, oof, recal, chosen, layout)
        return cls(layout, cohort, trained, classifier, groups, bags, tabs, class_tabs,
                   {pid: i for i, pid in enumerate(bags.ids)}, reference_km, same_run, _ledger_failures(layout),
                   recal, chosen, grid, training, spec)

    # -- one patient ---------------------------------------------------------------------------
    def render(self, pid: str, n_top: int, signed: list[Path] = ()) -> str:
        i = self.index[pid]
        features = self.bags.features[i]
        inputs = self.trained.inputs
        reads_tabular = "genomics" in inputs or "clinical" in inputs
        # A patient of the training cohort is explained by the one fold model that never trained on
        # them; a new patient by every fold model (none trained on them).
        fold = self._oof_fold(pid)
        chosen = [fold] if fold is not None else list(range(len(self.trained.folds)))
        explained = [self.trained.folds[k] for k in chosen]
        can_score = len(features) > 0 or reads_tabular
        explanations = [explain_patient(f.model, features, _row(self.tabs[k], i), f.discrete, attribute=reads_tabular,
                                        baselines={"clinical": sections.average_clinical(f.prep)})
                        for k, f in zip(chosen, explained, strict=True)] if can_score else []
        risk = self._risk(pid, explanations, explained, fold)
        curve = risk.get("absolute", {}).get("curve")
        km_png = plots.png_bytes(plots.km_figure(self.reference_km, self.spec.time_unit,
                                                 "Training cohort risk groups (Kaplan–Meier, 95% bands)",
                                                 patient={**curve, "group": risk.get("group")} if curve else None),
                                 dpi=100)
        slides = sections.slides(self, pid, explanations, n_top) if "tiles" in inputs else []
        modalities = sections.modalities(self, i, inputs, slides)
        context = {
            "pid": pid, "risk": risk, "km_png": km_png, "slides": slides, "modalities": modalities,
            "inputs": inputs, "inputs_text": sections.inputs_sentence(inputs),
            "explain": sections.attributions(self, explanations, explained, i) if reads_tabular else None,
            "classification": sections.classification(self, pid, i),
            "flags": sections.flags(self, i, risk, slides, explanations, explained, inputs),
            "ood": sections.out_of_distribution(self, i, explained, inputs),
            "model": self._model_card(fold), "training": self.training, "intended_use": self.spec.intended_use,
            "training_cohort": self.spec.name,
            "time_unit": self.spec.time_unit, "created": dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
            "data_uri": data_uri, "version": __version__, "sign_off": sign_off_block(),
            "signed": [p.name for p in signed],
            "explained_by": (f"by the fold {fold} model, which did not train on this patient" if fold is not None
                             else f"averaged over the {len(chosen)} fold models (none trained on this patient)"),
        }
        return render("patient.html.j2", **context)

    def _oof_fold(self, pid: str) -> int | None:
        """The fold in which this patient was a test patient (same run only), else None."""
        oof = self.trained.oof
        row = oof[oof.patient_id == pid] if self.same_run else oof.iloc[0:0]
        return int(row.fold.iloc[0]) if len(row) else None

    def _risk(self, pid: str, explanations: list[FoldExplanation], explained: list[Fold], fold: int | None) -> dict:
        """Percentile, group (with its cut) and absolute risks of one patient."""
        oof = self.trained.oof
        if fold is not None:
            value = float(oof.loc[oof.patient_id == pid, "risk"].iloc[0])
            percentile = float(percentile_of([value], self.trained.folds[fold].percentiles)[0])
            fold_percentiles, source = None, f"fold {fold} model (it did not train on this patient)"
        elif explanations:
            # Each fold model's risk is on its own scale: average the percentiles, never the raw risks.
            fold_percentiles = [float(percentile_of([e.risk], f.percentiles)[0])
                                for e, f in zip(explanations, explained, strict=True)]
            percentile = float(np.mean(fold_percentiles))
            value = float(np.mean([e.risk for e in explanations]))
            source = f"mean percentile of the {len(explanations)} fold models"
        else:
            return {"available": False}
        absolute = absolute_risk(self.recal, self.horizons, self.grid, percentile, fold, fold_percentiles)
        return {"available": True, "value": value, "percentile": percentile, "fold": fold, "source": source,
                "scheme": self.groups, **risk_group(percentile, self.groups), "absolute": absolute}

    def _model_card(self, fold: int | None) -> dict:
        t = self.trained
        first = t.folds[0].config
        return {"name": t.name, "model": first["model"], "encoder": first["encoder"],
                "loss": first.get("loss") or t.cv.get("loss"), "config_hash": first.get("config_hash"),
                "weights": (t.folds[fold if fold is not None else 0].config.get("weights_sha256") or "")[:12],
                "folds": len(t.folds), "fold_table": (t.cv.get("fold_table") or {}).get("fingerprint"),
                "trained": dt.datetime.fromtimestamp((t.directory / "fold-0" / "model.safetensors").stat().st_mtime)
                .strftime("%Y-%m-%d")}


def _training_summary(trained: TrainedModel, oof: OutOfFold, recal: Recalibration, horizons: list[float],
                      layout: RunLayout) -> dict:
    """The training cohort (n, events, follow-up) and fold-honest validation: C with its CI, td-AUC,
    and the calibration of the recalibrated absolute risks at the report's horizons."""
    preds = oof.preds
    time, event = preds["time"].to_numpy(float), preds["event"].to_numpy(int)
    c = fold_mean_c(oof, n_boot=500)
    absolute = cross_fitted_risk(oof, recal)
    calibration = [stats.calibration_at(time, event, absolute[:, recal.horizons.index(h)], h) for h in horizons]
    analysis = {}
    path = trained.directory.parent.parent / "analysis" / "metrics.json"
    if path.exists():
        analysis = next((m for m in json.loads(path.read_text())["models"] if m["model"] == trained.name), {})
    return {"n": len(preds), "events": int(event.sum()), "follow_up": median_follow_up(time, event),
            "c": c["c_index_mean"], "c_ci": c["c_index_ci"], "c_sd": c["c_index_sd"], "folds": len(oof.folds),
            "td_auc": analysis.get("td_auc_mean"), "calibration": calibration, "recal_n": recal.n,
            "gamma": recal.gamma}


def _ledger_failures(layout: RunLayout) -> dict[str, str]:
    """Slides whose last recorded step failed, with the reason."""
    failures = {}
    for e in layout.ledger.entries():
        if e.get("status") == "failed":
            failures[e["item"]] = f"{e['step']}: {e.get('error', 'failed')}"
        elif e.get("status") == "done":
            failures.pop(e["item"], None)
    return failures


def _row(tab: dict[str, np.ndarray], i: int) -> dict[str, np.ndarray]:
    return {k: v[i] for k, v in tab.items()}


__all__ = ["write_reports", "load_trained", "ReportContext", "TrainedModel"]
