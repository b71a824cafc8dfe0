"""`fusion report`: one self-contained HTML page (and a PDF) per patient, for the clinician.

A report holds that patient's data alone: the cohort appears only as aggregate Kaplan-Meier curves
and the model's cross-validated metrics. The risk of a patient the model was cross-validated on is
their out-of-fold risk (the fold model that never saw them); a new patient is scored by every fold
model and the scores averaged. The percentile places a risk among the risks the fold model gave its
own training patients, so the risk group uses the same cut as `fusion analyze`.
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
from fusion.cohort import Cohort, check_id
from fusion.errors import RunError, storage_error
from fusion.features.extract import read_features
from fusion.report import plots, stats
from fusion.report.explain import FoldExplanation, explain_patient
from fusion.report.html import data_uri, render
from fusion.report.slide_images import slide_pictures
from fusion.run import RunLayout
from fusion.storage import write_text
from fusion.survival.crossval import load_out_of_fold, percentile_of, training_percentile
from fusion.train.checkpoint import fold_dirs, load_checkpoint
from fusion.train.data import Bags, Preprocessor, load_bags
from fusion.train.loop import MULTIMODAL, survival_at
from fusion.wsi.tiling import read_coords

LITTLE_TISSUE_TILES = 50  # fewer tiles than this: the slide shows little tissue at the working resolution


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
                  on_report: Callable[[str], None] | None = None) -> list[Path]:
    """Write `reports/<patient_id>.html` (+ `.pdf`) for the patients named (default: every patient
    of the cohort). `model` is a model name of this run or a model folder of another run."""
    model_dir = Path(model) if Path(model).is_dir() else layout.model_dir(str(model))
    trained = load_trained(model_dir)
    if trained.classify:
        raise RunError(f"{model_dir.name} is a classification model; give the survival model "
                       f"(its '-classification' sibling is picked up by itself)")
    classifier_dir = model_dir.parent / f"{model_dir.name}-classification"
    classifier = load_trained(classifier_dir) if (classifier_dir / "fold-0" / "model.safetensors").exists() else None
    context = ReportContext.build(layout, cohort, trained, classifier, groups)
    ids = list(cohort.patients["patient_id"]) if patient_ids is None else list(patient_ids)
    unknown = [p for p in ids if p not in context.index]
    if unknown:
        raise RunError(f"patient(s) not in the cohort {cohort.root}: {', '.join(unknown[:10])}"
                       + (f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""))
    out = Path(out_dir) if out_dir else layout.reports
    written = []
    with one_torch_thread():  # one patient's forward passes are tiny: thread hand-offs would dominate
        for pid in ids:
            # One patient's problem (a slide gone since tiling, a damaged file) is recorded and the
            # others' reports are still written; only a failing disk stops the stage.
            try:
                path = layout.report_path(pid) if out_dir is None else Path(out) / f"{check_id(pid, 'patient id')}.html"
                written.append(write_text(path, context.render(pid, n_top)))
            except Exception as e:  # noqa: BLE001 - the per-patient boundary
                if storage_error(e, str(layout.root)) is not None:
                    raise storage_error(e, str(layout.root)) from None
                layout.ledger.record("report", pid, "failed", error=" ".join(str(e).split()) or type(e).__name__,
                                     error_type=type(e).__name__, model=model_dir.name)
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
    horizon_max: float
    same_run: bool
    ledger_failures: dict[str, str]
    analysis: dict

    @classmethod
    def build(cls, layout: RunLayout, cohort: Cohort, trained: TrainedModel, classifier: TrainedModel | None,
              groups: str) -> ReportContext:
        train = trained.config["train_config"]
        bags, _ = load_bags(layout, cohort, trained.config["encoder"], train.get("tile_set", ""),
                            keep_without_tiles=True)
        tabs = [f.prep.transform(bags) for f in trained.folds]
        class_tabs = [f.prep.transform(bags) for f in classifier.folds] if classifier else []
        same_run = trained.directory.resolve().parent.parent == layout.root.resolve()
        oof = trained.oof
        if oof is None or not len(oof):
            raise RunError(f"{trained.directory} has no out-of-fold predictions: the cohort reference is missing")
        out_of_fold = load_out_of_fold(trained.directory)
        if not out_of_fold.has_cutoffs:
            raise RunError(f"{trained.directory} was trained before folds stored their training risks: "
                           "risk groups cannot be placed without looking at the test folds; retrain it")
        pct = training_percentile(out_of_fold)
        reference_km = stats.kaplan_meier(oof["time"], oof["event"], stats.risk_groups(pct, groups))
        failures = {}
        for e in layout.ledger.entries():
            if e.get("status") == "failed":
                failures[e["item"]] = f"{e['step']}: {e.get('error', 'failed')}"
            elif e.get("status") == "done":
                failures.pop(e["item"], None)
        analysis_path = layout.analysis / "metrics.json"
        analysis = {}
        if analysis_path.exists():
            analysis = next((m for m in json.loads(analysis_path.read_text())["models"]
                             if m["model"] == trained.name), {})
        return cls(layout, cohort, trained, classifier, groups, bags, tabs, class_tabs,
                   {pid: i for i, pid in enumerate(bags.ids)}, reference_km, float(oof["time"].max()),
                   same_run, failures, analysis)

    # -- one patient ---------------------------------------------------------------------------
    def render(self, pid: str, n_top: int) -> str:
        i = self.index[pid]
        features = self.bags.features[i]
        multimodal = self.trained.config["model"] in MULTIMODAL
        # A patient of the training cohort is explained by the one fold model that never trained on
        # them; a new patient by every fold model (none trained on them).
        fold = self._oof_fold(pid)
        chosen = [fold] if fold is not None else list(range(len(self.trained.folds)))
        if not len(features) and not multimodal:
            explanations = []
        else:
            explanations = [explain_patient(self.trained.folds[k].model, features, _row(self.tabs[k], i),
                                            self.trained.folds[k].discrete, attribute=multimodal,
                                            baselines={"clinical": _average_clinical(self.trained.folds[k].prep)})
                            for k in chosen]
        self._explained = [self.trained.folds[k] for k in chosen]
        risk = self._risk(pid, explanations)
        curve = self._curve(pid, explanations, risk)
        km_png = plots.png_bytes(plots.km_figure(self.reference_km, self.cohort.spec.time_unit,
                                                 "Cohort risk groups (Kaplan–Meier, 95% bands)",
                                                 patient={**curve, "group": risk.get("group")} if curve else None),
                                 dpi=100)
        slides = self._slides(pid, explanations, n_top)
        context = {
            "pid": pid, "risk": risk, "curve": curve, "km_png": km_png, "slides": slides,
            "genes": _top(self._attributions(explanations, "genomics"), 8) if multimodal else [],
            "clinical": self._clinical(explanations, i) if multimodal else [],
            "classification": self._classification(pid, i),
            "flags": self._flags(pid, i, risk, slides, explanations), "model": self._model_card(),
            "time_unit": self.cohort.spec.time_unit, "created": dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
            "data_uri": data_uri, "version": __version__,
        }
        return render("patient.html.j2", **context)

    def _oof_fold(self, pid: str) -> int | None:
        """The fold in which this patient was a test patient (same run only), else None."""
        oof = self.trained.oof
        row = oof[oof.patient_id == pid] if self.same_run else oof.iloc[0:0]
        return int(row.fold.iloc[0]) if len(row) else None

    def _risk(self, pid: str, explanations: list[FoldExplanation]) -> dict:
        oof = self.trained.oof
        row = oof[oof.patient_id == pid] if self.same_run else oof.iloc[0:0]
        if len(row):
            fold = int(row.fold.iloc[0])
            value = float(row.risk.iloc[0])
            percentile = float(percentile_of([value], self.trained.folds[fold].percentiles)[0])
            source = f"out-of-fold (fold {fold}: the model that did not train on this patient)"
        elif explanations:
            # Each fold model's risk is on its own scale: average the percentiles, never the raw risks.
            fold = None
            per_fold = [percentile_of([e.risk], f.percentiles)[0] for e, f in
                        zip(explanations, self._explained, strict=True)]
            percentile = float(np.mean(per_fold))
            value = float(np.mean([e.risk for e in explanations]))
            source = f"mean of {len(explanations)} fold models"
        else:
            return {"available": False}
        group = str(stats.risk_groups([percentile], self.groups)[0]) if np.isfinite(percentile) else None
        return {"available": True, "value": value, "percentile": percentile, "group": group, "fold": fold,
                "source": source, "scheme": self.groups}

    def _curve(self, pid: str, explanations: list[FoldExplanation], risk: dict) -> dict | None:
        if not explanations or not risk.get("available"):
            return None
        grid = np.linspace(0, self.horizon_max, 120)
        curves = []
        for e, f in zip(explanations, self._explained, strict=True):
            if f.discrete:
                edges = np.asarray(f.config["bin_edges"], float)
                s = np.concatenate([[1.0], np.cumprod(1 - e.hazards)])
                curves.append(s[np.searchsorted(edges, grid, side="right")])
            elif f.config.get("baseline_survival"):
                curves.append(survival_at(f.config["baseline_survival"], [e.risk], grid)[0])
        if not curves:
            return None
        curves = np.stack(curves)
        centre = curves.mean(0)
        horizons = [h for h in (12.0, 36.0, 60.0) if h <= self.horizon_max]
        at = [{"time": h, "survival": float(np.interp(h, grid, centre)),
               "low": float(np.interp(h, grid, curves.min(0))), "high": float(np.interp(h, grid, curves.max(0)))}
              for h in horizons]
        band = f"range over the {len(curves)} cross-validation fold models" if len(curves) > 1 else \
            "none: one fold model, the one that did not train on this patient"
        return {"time": grid, "survival": centre, "low": curves.min(0), "high": curves.max(0), "at": at,
                "band": band}

    def _slides(self, pid: str, explanations: list[FoldExplanation], n_top: int) -> list[dict]:
        """Per slide: tile count, heatmap and top tiles (attention averaged over the fold models)."""
        encoders = self.trained.config["encoder"].split("+")
        tile_set = self.trained.config["train_config"].get("tile_set", "")
        attention = np.mean([e.attention for e in explanations], 0) if explanations and \
            len(explanations[0].attention) else np.zeros(0)
        out, start = [], 0
        for s in self.cohort.slides_of(pid).itertuples():
            info = {"slide_id": s.slide_id, "n_tiles": 0, "failed": self.ledger_failures.get(s.slide_id)}
            feat_paths = [self.layout.features_h5(e, s.slide_id, tile_set) for e in encoders]
            feat_path, tiles_path = feat_paths[0], self.layout.tiles_h5(s.slide_id, tile_set)
            # the bag holds the slides featurised by every encoder, in this order (see load_bags)
            if all(p.exists() for p in feat_paths) and tiles_path.exists():
                _, coords, _ = read_features(feat_path)
                _, attrs = read_coords(tiles_path)
                n = len(coords)
                info["n_tiles"] = n
                if n and len(attention) >= start + n:
                    att = attention[start:start + n]
                    pics = slide_pictures(self.cohort.root / s.path, coords, float(attrs["patch_size_level0"]),
                                          att, n_top, mpp=_slide_mpp(s))
                    info.update(pics)
                start += n
            out.append(info)
        return out

    def _attributions(self, explanations: list[FoldExplanation], kind: str) -> dict[str, float]:
        """Mean attribution per input name over the fold models (folds may select different genes)."""
        totals: dict[str, float] = {}
        for e, f in zip(explanations, self._explained, strict=True):
            values = getattr(e, kind)
            if values is None:
                continue
            names = f.prep.genes if kind == "genomics" else _clinical_columns(f.prep)
            for name, v in zip(names, values, strict=False):
                totals[name] = totals.get(name, 0.0) + float(v) / len(explanations)
        return totals

    def _clinical(self, explanations: list[FoldExplanation], i: int) -> list[dict]:
        """Clinical factors: one-hot columns summed back to their variable, with the patient's value."""
        per_column = self._attributions(explanations, "clinical")
        by_variable: dict[str, float] = {}
        for column, v in per_column.items():
            var = column.split("=", 1)[0]
            by_variable[var] = by_variable.get(var, 0.0) + v
        values = self.bags.clinical.iloc[i] if self.bags.clinical is not None else {}
        rows = [{"name": var, "value": _display(values.get(var)), "attribution": a} for var, a in by_variable.items()]
        return _scale(sorted(rows, key=lambda r: -abs(r["attribution"])))

    def _classification(self, pid: str, i: int) -> dict | None:
        c = self.classifier
        if c is None:
            return None
        classes = c.config.get("classes") or []
        row = c.oof[c.oof.patient_id == pid] if (c.oof is not None and self.same_run) else pd.DataFrame()
        if len(row):
            probs = [float(row[f"prob_{k}"].iloc[0]) for k in classes]
            source = "out-of-fold"
        else:
            feats = self.bags.features[i]
            if not len(feats) and c.config["model"] not in MULTIMODAL:
                return None
            probs = np.mean([explain_patient(f.model, feats, _row(tab, i), False, classify=True).probabilities
                             for f, tab in zip(c.folds, self.class_tabs, strict=True)], 0).tolist()
            source = f"mean of {len(c.folds)} fold models"
        k = int(np.argmax(probs))
        auc = c.cv.get("auc_mean")
        return {"model": c.name, "predicted": classes[k], "probability": probs[k], "source": source,
                "probabilities": dict(zip(classes, probs, strict=True)), "auc_mean": auc, "auc_sd": c.cv.get("auc_sd")}

    def _flags(self, pid: str, i: int, risk: dict, slides: list[dict],
               explanations: list[FoldExplanation]) -> list[str]:
        flags = []
        if not slides:
            flags.append("No slide for this patient: the risk rests on genomics and clinical data alone.")
        for s in slides:
            if s["failed"]:
                flags.append(f"Slide {s['slide_id']} failed ({s['failed']}): it is not part of this assessment.")
            elif s["n_tiles"] == 0:
                flags.append(f"Slide {s['slide_id']} gave no usable tile (no tissue found or not yet processed).")
            elif s["n_tiles"] < LITTLE_TISSUE_TILES:
                flags.append(f"Slide {s['slide_id']} has little tissue: {s['n_tiles']} tiles.")
        if self.bags.genomics is None or np.isnan(self.bags.genomics[i]).all():
            flags.append("No genomics: the model used its learned 'missing genomics' input.")
        if self.bags.clinical is not None:
            missing = [c for c in self.bags.clinical.columns if pd.isna(self.bags.clinical.iloc[i][c])]
            if missing:
                flags.append(f"Missing clinical value(s): {', '.join(missing)} (the training mean, or the training "
                             "mix of categories, was used).")
            flags += self._unseen_levels(i)
        errors = [e.completeness_error for e in explanations if e.completeness_error is not None]
        if errors and max(errors) >= 0.05:
            flags.append(f"The gene and clinical contributions are approximate: they add up to the risk difference "
                         f"only within {100 * max(errors):.0f}% (integrated gradients).")
        if not risk.get("available"):
            flags.append("No risk could be computed: this model needs tiles and the patient has none.")
        elif risk["percentile"] <= 0.5 or risk["percentile"] >= 99.5:
            flags.append("The risk lies outside the range the model saw in training: read it with caution.")
        return flags

    def _unseen_levels(self, i: int) -> list[str]:
        """A flag for clinical categories the explaining fold models never saw in training."""
        unseen = sorted({f"{col} = '{value}'" for f in self._explained
                         for col, value in f.prep.unseen_levels(self.bags.clinical.iloc[i])})
        return [f"Clinical value(s) never seen in training: {', '.join(unseen)}; the model used the training "
                "cohort's mix of categories for them."] if unseen else []

    def _model_card(self) -> dict:
        t = self.trained
        first = t.folds[0].config
        card = {"name": t.name, "model": first["model"], "encoder": first["encoder"],
                "config_hash": first.get("config_hash"), "weights": (first.get("weights_sha256") or "")[:12],
                "folds": len(t.folds), "n_patients": t.cv.get("n_patients"), "n_events": t.cv.get("n_events"),
                "c_index_mean": t.cv.get("c_index_mean"), "c_index_sd": t.cv.get("c_index_sd"),
                "trained": dt.datetime.fromtimestamp((t.directory / "fold-0" / "model.safetensors").stat().st_mtime)
                .strftime("%Y-%m-%d")}
        a = self.analysis
        if a:
            card.update(harrell_c=a.get("harrell_c"), harrell_c_ci=a.get("harrell_c_ci"), uno_c=a.get("uno_c"),
                        td_auc_mean=a.get("td_auc_mean"), ibs=a.get("integrated_brier_score"))
        return card


def _slide_mpp(row) -> float | None:
    """The cohort's per-slide mpp hint (optional `mpp` column of slides.csv)."""
    value = getattr(row, "mpp", None)
    return float(value) if value is not None and pd.notna(value) else None


def _row(tab: dict[str, np.ndarray], i: int) -> dict[str, np.ndarray]:
    return {k: v[i] for k, v in tab.items()}


def _average_clinical(prep: Preprocessor) -> np.ndarray:
    """The training fold's average patient in preprocessed clinical columns: 0 for z-scored numbers,
    each category's share for one-hot columns (zeros for models saved before shares were stored)."""
    shares = [prep.category_freq.get(col) or [0.0] * len(cats) for col, cats in prep.categories.items()]
    return np.concatenate([np.zeros(len(prep.numeric)), *map(np.asarray, shares)]).astype(np.float32)


def _clinical_columns(prep: Preprocessor) -> list[str]:
    """Names of the preprocessed clinical columns, in `Preprocessor.transform` order."""
    return list(prep.numeric) + [f"{col}={c}" for col, cats in prep.categories.items() for c in cats]


def _display(value) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "missing"
    return str(value)


def _top(attributions: dict[str, float], n: int) -> list[dict]:
    rows = [{"name": k, "attribution": v} for k, v in attributions.items()]
    rows.sort(key=lambda r: -abs(r["attribution"]))
    return _scale(rows[:n])


def _scale(rows: list[dict]) -> list[dict]:
    """Bar widths (percent of the largest |attribution|) for the HTML bars."""
    top = max((abs(r["attribution"]) for r in rows), default=0.0) or 1.0
    return [{**r, "width": 100 * abs(r["attribution"]) / top} for r in rows]


__all__ = ["write_reports", "load_trained", "ReportContext"]
