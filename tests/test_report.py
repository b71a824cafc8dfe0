"""Cohort analysis and clinician reports: statistics checked against lifelines / scikit-survival
called directly, and the HTML opened in a real headless Chromium (images loaded, risk shown,
printable to PDF, screenshot not blank)."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pandas as pd
import pytest

from fusion.report.analysis import analyze_run
from fusion.report.patient import write_reports
from fusion.run import init_run, open_run
from fusion.stages import train_stage
from fusion.train.loop import TrainConfig

MODEL = "coattn"


@pytest.fixture(scope="module")
def reported(tiny_run, tmp_path_factory):
    """A private copy of the tiny run (one patient without genomics, one failed slide in the
    ledger), a multimodal survival model, its classifier, a baseline, the analysis and 3 reports."""
    root = tmp_path_factory.mktemp("report")
    cohort_dir = root / "cohort"
    src_layout, src_cohort = open_run(tiny_run)
    shutil.copytree(src_cohort.root, cohort_dir)
    genomics = pd.read_csv(cohort_dir / "genomics.csv", dtype={"patient_id": str})
    no_genes = genomics.patient_id.iloc[0]
    genomics.iloc[1:].to_csv(cohort_dir / "genomics.csv", index=False)
    layout = init_run(root / "run", cohort_dir)
    for part in ("tiles", "features"):
        shutil.copytree(src_layout.root / part, layout.root / part)
    layout, cohort = open_run(layout.root)
    slides = cohort.slides.set_index("slide_id")
    failed_slide = slides.index[-1]
    layout.ledger.record("extract", failed_slide, "failed", error="SlideReadError: truncated file")

    config = dict(model=MODEL, folds=3, epochs=15, patience=6, hidden=32)
    train_stage(layout, cohort, TrainConfig(**config))
    train_stage(layout, cohort, TrainConfig(**config, task="classification"))
    train_stage(layout, cohort, TrainConfig(**{**config, "model": "abmil"}))  # reads slides only
    train_stage(layout, cohort, TrainConfig(model="clinical_cox", folds=3))
    analysis = analyze_run(layout, cohort, n_boot=200)
    patients = [no_genes, slides.loc[failed_slide, "patient_id"], cohort.patients.index[5]]
    written = write_reports(layout, cohort, MODEL, patients)
    return {"layout": layout, "cohort": cohort, "analysis": analysis, "patients": patients, "written": written,
            "no_genes": no_genes, "failed_slide": failed_slide}


def _model_metrics(layout, name: str) -> dict:
    report = json.loads((layout.analysis / "metrics.json").read_text())
    return next(m for m in report["models"] if m["model"] == name)


def test_statistics_match_lifelines_and_sksurv(reported):
    from lifelines import CoxPHFitter, KaplanMeierFitter
    from lifelines.statistics import multivariate_logrank_test
    from lifelines.utils import concordance_index
    from sksurv.metrics import (
        concordance_index_censored,
        concordance_index_ipcw,
        cumulative_dynamic_auc,
        integrated_brier_score,
    )
    from sksurv.util import Surv

    layout, cohort = reported["layout"], reported["cohort"]
    m = _model_metrics(layout, MODEL)
    p = pd.read_parquet(layout.model_dir(MODEL) / "predictions.parquet")
    t, e, r = p.time.to_numpy(), p.event.to_numpy().astype(bool), p.risk.to_numpy()
    y = Surv.from_arrays(e, t)

    # Headline: Harrell's C inside each test fold, averaged.
    per_fold = [concordance_index_censored(g.event.astype(bool), g.time, g.risk)[0] for _, g in p.groupby("fold")]
    assert m["harrell_c"] == pytest.approx(np.mean(per_fold), abs=1e-12)
    assert m["harrell_c_folds"] == pytest.approx(per_fold, abs=1e-12)
    lifelines_c = [concordance_index(g.time, -g.risk, g.event) for _, g in p.groupby("fold")]
    assert m["harrell_c"] == pytest.approx(np.mean(lifelines_c), abs=1e-6)
    # Pooled statistics: each patient's percentile among its training fold's risks (recomputed here).
    cuts = {k: json.loads((layout.model_dir(MODEL) / f"fold-{k}" / "metrics.json").read_text())
            ["train_risk_cutoffs"]["percentiles"] for k in p.fold.unique()}
    scale = np.array([np.interp(risk, cuts[k], np.arange(101)) for risk, k in zip(r, p.fold, strict=True)])
    assert m["harrell_c_pooled"] == pytest.approx(concordance_index_censored(e, t, scale)[0], abs=1e-6)
    times = m["td_auc_times"]
    assert times == sorted(set.intersection(*[set(json.loads(
        (layout.model_dir(MODEL) / f"fold-{k}" / "metrics.json").read_text())["horizons"]) for k in p.fold.unique()]))
    tau = max(times)
    assert m["uno_c"] == pytest.approx(concordance_index_ipcw(y, y, scale, tau=tau)[0], abs=1e-6)
    auc, mean_auc = cumulative_dynamic_auc(y, y, scale, times)
    np.testing.assert_allclose(m["td_auc"], auc, atol=1e-6)
    assert m["td_auc_mean"] == pytest.approx(mean_auc, abs=1e-6)
    surv = p[[f"surv_{h:g}" for h in times]].to_numpy()
    assert m["integrated_brier_score"] == pytest.approx(integrated_brier_score(y, y, surv, times), abs=1e-12)

    # Risk groups recomputed here from each training fold's stored median.
    cut = {k: json.loads((layout.model_dir(MODEL) / f"fold-{k}" / "metrics.json").read_text())
           ["train_risk_cutoffs"]["median"] for k in p.fold.unique()}
    group = np.where(p.risk.to_numpy() >= p.fold.map(cut).to_numpy(), "high", "low")
    assert m["logrank_p"] == pytest.approx(multivariate_logrank_test(t, group, e).p_value, rel=1e-9)
    for g in ("low", "high"):
        km = KaplanMeierFitter().fit(t[group == g], e[group == g])
        curve = m["kaplan_meier"]["groups"][g]
        np.testing.assert_allclose(curve["survival"], km.survival_function_.iloc[:, 0].to_numpy())
        assert curve["n"] == (group == g).sum()

    clinical = cohort.patients.loc[p.patient_id, list(cohort.spec.clinical)].reset_index(drop=True)
    frame = pd.DataFrame({"time": t, "event": e.astype(int), "risk_group=high": (group == "high").astype(float),
                          "age": clinical.age.astype(float)})
    for col in ("grade", "stage", "er_status"):
        levels = sorted(clinical[col].astype(str).unique())
        for level in levels[1:]:
            frame[f"{col}={level}"] = (clinical[col].astype(str) == level).astype(float)
    frame = frame.loc[:, frame.std() > 0]
    cph = CoxPHFitter().fit(frame, "time", "event")
    hr = {h["term"]: h for h in m["hazard_ratios"] if h["analysis"] == "multivariate"}
    for term, row in cph.summary.iterrows():
        assert hr[term]["hr"] == pytest.approx(row["exp(coef)"], rel=1e-6), term
        assert hr[term]["p"] == pytest.approx(row["p"], rel=1e-6), term
    low, high = m["harrell_c_ci"]
    assert low < m["harrell_c"] < high and high - low > 0.02


def test_classification_metrics_match_sklearn(reported):
    from sklearn.metrics import balanced_accuracy_score, confusion_matrix, f1_score, roc_auc_score

    layout = reported["layout"]
    name = f"{MODEL}-classification"
    m = _model_metrics(layout, name)
    p = pd.read_parquet(layout.model_dir(name) / "predictions.parquet")
    y = (p.label == m["classes"][1]).astype(int)
    pred = (p[f"prob_{m['classes'][1]}"] > p[f"prob_{m['classes'][0]}"]).astype(int)
    per_fold = [roc_auc_score((g.label == m["classes"][1]).astype(int), g[f"prob_{m['classes'][1]}"])
                for _, g in p.groupby("fold")]
    assert m["auc"] == pytest.approx(np.mean(per_fold), abs=1e-12)  # the headline: per test fold
    assert m["auc_pooled"] == pytest.approx(roc_auc_score(y, p[f"prob_{m['classes'][1]}"]), abs=1e-12)
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert m["f1"] == pytest.approx(f1_score(y, pred))
    assert m["confusion_matrix"] == confusion_matrix(y, pred).tolist()


def test_analysis_artifacts(reported):
    layout = reported["layout"]
    summary = pd.read_csv(layout.analysis / "summary.csv")
    assert {MODEL, "clinical_cox", f"{MODEL}-classification"} <= set(summary.model)
    for name in ("km", "calibration", "forest", "decision_curve"):
        for ext in ("png", "svg"):
            assert (layout.analysis / MODEL / f"{name}.{ext}").stat().st_size > 1000
    assert (layout.analysis / f"{MODEL}-classification" / "roc.png").exists()
    json.loads((layout.analysis / "metrics.json").read_text())  # strict JSON (no NaN)
    html = (layout.analysis / "report.html").read_text()
    assert "<img" in html and 'src="data:image/png;base64,' in html and 'src="/' not in html
    assert 'id="tripod"' in html and "for a person to write" in html and "median follow-up" in html


def _open(page, path):
    page.goto(path.resolve().as_uri(), wait_until="load")
    return page.evaluate("""() => Array.from(document.images).map(i => ({ok: i.complete && i.naturalWidth > 0,
                                                                          alt: i.alt}))""")


def _non_blank(png: bytes) -> tuple[tuple[int, int], float, int]:
    import io

    from PIL import Image

    img = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    not_white = (img < 245).any(-1).mean()
    colours = len(np.unique(img.reshape(-1, 3)[::7], axis=0))
    return img.shape[1::-1], float(not_white), colours


def test_reports_render_in_headless_chromium(reported):
    from playwright.sync_api import sync_playwright

    from fusion.report.pdf import launch

    layout, pid = reported["layout"], reported["patients"][2]
    html_path = layout.reports / f"{pid}.html"
    with sync_playwright() as p:
        browser = launch(p)
        page = browser.new_page(viewport={"width": 1000, "height": 1400})
        images = _open(page, html_path)
        assert len(images) >= 3 and all(i["ok"] for i in images), images  # survival plot, heatmap, tiles
        group = page.inner_text("#risk-group")
        assert re.search(r"(low|high) risk", group), group
        assert re.search(r"percentile \d+ (≥|<) 50, the training cohort's median", page.inner_text("#risk-threshold"))
        assert re.search(r"12 months\s+\d+%\s+95% CI \d+–\d+%", page.inner_text("#absolute-risk"))
        assert "th" in page.inner_text("#risk-percentile")
        assert page.pdf(format="A4")[:4] == b"%PDF"
        size, ink, colours = _non_blank(page.screenshot(full_page=True))
        assert size[0] == 1000 and size[1] > 1400, size
        assert ink > 0.15 and colours > 200, (ink, colours)

        images = _open(page, layout.analysis / "report.html")
        assert len(images) >= 6 and all(i["ok"] for i in images), images
        assert MODEL in page.inner_text("#headline")
        assert page.pdf(format="A4")[:4] == b"%PDF"
        size, ink, colours = _non_blank(page.screenshot(full_page=True))
        assert size[0] == 1000 and size[1] > 2000 and ink > 0.05 and colours > 200, (size, ink, colours)
        browser.close()
    pdf = html_path.with_suffix(".pdf")
    assert pdf.read_bytes()[:4] == b"%PDF" and pdf.stat().st_size > 20_000


def test_report_shows_the_patients_group_and_nobody_elses_data(reported):
    layout = reported["layout"]
    for pid in reported["patients"]:
        html = (layout.reports / f"{pid}.html").read_text()
        text = re.sub(r'data:[^"]+', "", html)  # embedded images are base64, not text
        others = set(re.findall(r"P\d{4}", text)) - {pid}
        assert not others, f"report of {pid} mentions {others}"
        oof = pd.read_parquet(layout.model_dir(MODEL) / "predictions.parquet").set_index("patient_id")
        fold = int(oof.loc[pid, "fold"])
        median = json.loads((layout.model_dir(MODEL) / f"fold-{fold}" / "metrics.json").read_text())[
            "train_risk_cutoffs"]["median"]
        expected = "high" if oof.loc[pid, "risk"] >= median else "low"
        assert f'class="group {expected}"' in html
        assert f"by the fold {fold} model, which did not train on this patient" in html
        assert "research use only" in html.lower()
    first = (layout.reports / f"{reported['no_genes']}.html").read_text()
    assert "No genomics" in first
    second = (layout.reports / f"{reported['patients'][1]}.html").read_text()
    assert f"Slide {reported['failed_slide']} failed" in second and "truncated file" in second


def test_new_patients_are_scored_by_the_fold_ensemble(reported, tmp_path):
    """A model from one run reports on another run's patients (the scheduled-scoring case)."""
    layout, cohort = reported["layout"], reported["cohort"]
    other = init_run(tmp_path / "other", cohort.root)
    for part in ("tiles", "features"):
        shutil.copytree(layout.root / part, other.root / part)
    other, other_cohort = open_run(other.root)
    pid = reported["patients"][2]
    [html] = write_reports(other, other_cohort, layout.model_dir(MODEL), [pid], pdf=False)
    text = html.read_text()
    assert "mean of 3 fold models" in text and html.parent == other.root / "reports"


def test_unknown_patient_is_named(reported):
    from fusion.errors import RunError

    with pytest.raises(RunError, match="NOPE-1"):
        write_reports(reported["layout"], reported["cohort"], MODEL, ["NOPE-1"], pdf=False)


def test_analysis_of_models_trained_before_curves_and_cutoffs_were_stored(reported, tmp_path):
    """Older model folders (no survival columns, no training-fold percentiles) still analyse: the
    per-fold C is reported; pooled statistics and risk groups, which would need the folds' training
    risks, are listed as not estimable instead of being computed on mixed fold scales."""
    from fusion.run import RunLayout

    layout = RunLayout(tmp_path / "run")
    legacy = layout.model_dir("legacy_cox")
    shutil.copytree(reported["layout"].model_dir("clinical_cox"), legacy)
    preds = pd.read_parquet(legacy / "predictions.parquet")
    preds.drop(columns=[c for c in preds.columns if c.startswith("surv_")]).to_parquet(legacy / "predictions.parquet")
    for path in legacy.glob("fold-*/metrics.json"):
        metrics = json.loads(path.read_text())
        metrics.pop("train_risk_cutoffs")
        path.write_text(json.dumps(metrics))
    analyze_run(layout, reported["cohort"], n_boot=50)
    m = _model_metrics(layout, "legacy_cox")
    assert m["harrell_c"] > 0.5 and "harrell_c_pooled" not in m and "kaplan_meier" not in m
    assert "retrain" in m["not_estimable"]["pooled statistics and risk groups"]
    assert (layout.analysis / "report.html").stat().st_size > 5_000


def test_integrated_gradients_add_up_to_the_risk_difference(reported):
    """Completeness: genes' and clinical factors' attributions sum to risk(patient) minus the risk
    of the same slides with the training fold's average genomics and clinical profile."""
    from fusion.report.explain import explain_patient
    from fusion.report.patient import load_trained
    from fusion.report.patient_sections import average_clinical as _average_clinical
    from fusion.train.data import load_bags

    layout, cohort = reported["layout"], reported["cohort"]
    fold = load_trained(layout.model_dir(MODEL)).folds[0]
    bags, _ = load_bags(layout, cohort, fold.config["encoder"], keep_without_tiles=True)
    tab = fold.prep.transform(bags)
    average = _average_clinical(fold.prep)
    assert 0 < average[len(fold.prep.numeric):].sum() <= len(fold.prep.categories) + 1e-6  # category shares
    for i in (3, 11):
        row = {k: v[i] for k, v in tab.items()}
        e = explain_patient(fold.model, bags.features[i], row, fold.discrete, baselines={"clinical": average})
        assert e.completeness_error < 0.05 and e.ig_steps >= 32  # steps grow until the sum adds up
        reference = dict(row, genomics=np.zeros_like(row["genomics"]), clinical=average)
        r0 = explain_patient(fold.model, bags.features[i], reference, fold.discrete, attribute=False).risk
        total = e.genomics.sum() + e.clinical.sum()
        assert abs(e.risk - r0) > 1e-3
        assert total == pytest.approx(e.risk - r0, rel=0.05, abs=0.01), (total, e.risk - r0)


def test_summary_fits_one_a4_page_and_nothing_overflows(reported):
    """Printed (print media, A4 width), the summary section is at most one page high, and no element
    sticks out of the page on either the summary or the detail pages."""
    from playwright.sync_api import sync_playwright

    from fusion.report.pdf import launch

    width, height = 186 / 25.4 * 96, (297 - 28) / 25.4 * 96  # A4 inside the 12 mm / 14 mm margins, CSS px
    with sync_playwright() as p:
        browser = launch(p)
        page = browser.new_page(viewport={"width": int(width), "height": int(height)})
        for pid in reported["patients"]:
            page.goto((reported["layout"].reports / f"{pid}.html").resolve().as_uri(), wait_until="load")
            page.emulate_media(media="print")
            box = page.locator("#summary").bounding_box()
            assert box["height"] <= height, (pid, box)
            overflowing = page.evaluate(f"""() => Array.from(document.querySelectorAll('body *'))
                .filter(e => e.getBoundingClientRect().right > {width} + 1)
                .map(e => e.tagName + '#' + e.id + '.' + e.className)""")
            assert not overflowing, (pid, overflowing[:5])
            text = page.inner_text("#summary")
            for item in ("Risk group", "Percentile", "Probability of the event", "calibration slope",
                         "This model reads slides, genomics and clinical data", "Intended use", "Reviewer"):
                assert item in text, (pid, item)
        browser.close()


def test_every_pdf_page_names_the_patient(reported):
    from pypdf import PdfReader

    pid = reported["patients"][2]
    reader = PdfReader(reported["layout"].reports / f"{pid}.pdf")
    assert len(reader.pages) >= 2  # the summary page, then the details
    for number, page in enumerate(reader.pages, 1):
        text = page.extract_text()
        assert f"Patient {pid}" in text and f"page {number} of {len(reader.pages)}" in text, (number, text[:200])


def test_a_slide_only_model_says_only_what_it_reads(reported):
    """An abmil report: 'reads slides', genomics and clinical 'not used', and no flag about genomics
    even for the patient without any."""
    layout, cohort = reported["layout"], reported["cohort"]
    pid = reported["no_genes"]
    [html] = write_reports(layout, cohort, "abmil", [pid], out_dir=layout.root / "abmil-reports", pdf=False)
    text = re.sub(r"<[^>]+>", " ", re.sub(r'data:[^"]+', "", html.read_text()))
    assert "This model reads slides." in text and "slides, genomics" not in text
    assert "No genomics" not in text and "missing genomics" not in text
    assert "What moved the risk" not in text  # no genes or clinical factors to attribute


def test_new_patients_outside_the_training_cohort_are_warned_about(reported, tmp_path):
    """Scored by another run's model, a patient aged 150 (training: 30-90) is flagged in plain words."""
    layout, cohort = reported["layout"], reported["cohort"]
    cohort_dir = tmp_path / "cohort"
    shutil.copytree(cohort.root, cohort_dir)
    patients = pd.read_csv(cohort_dir / "patients.csv", dtype={"patient_id": str})
    pid = reported["patients"][2]
    patients.loc[patients.patient_id == pid, "age"] = 150
    patients.to_csv(cohort_dir / "patients.csv", index=False)
    other = init_run(tmp_path / "other", cohort_dir)
    for part in ("tiles", "features"):
        shutil.copytree(layout.root / part, other.root / part)
    other, other_cohort = open_run(other.root)
    [html] = write_reports(other, other_cohort, layout.model_dir(MODEL), [pid], pdf=False)
    text = html.read_text()
    assert "Unlike the training cohort: age = 150 lies outside the range of the training patients" in text
    assert "mean percentile of the 3 fold models" in text


def test_signing_writes_numbered_copies_and_an_audit_trail(reported, tmp_path):
    import hashlib

    from fusion.report.signing import sign_report

    reports = tmp_path / "reports"
    shutil.copytree(reported["layout"].reports, reports)
    pid = reported["patients"][2]
    draft = reports / f"{pid}.html"
    first = sign_report(reports, pid, "Dr A. Reviewer", "pathologist", "agree with comment", "consistent with grade")
    assert first.name == f"{pid}.v1.signed.html"
    signed = first.read_text()
    assert 'data-state="signed"' in signed and "Dr A. Reviewer" in signed and "consistent with grade" in signed
    assert "not yet reviewed" not in signed and "signed, version 1</strong>: Dr A. Reviewer" in signed
    assert "draft, not yet reviewed" in draft.read_text()
    assert 'data-state="unsigned"' in draft.read_text()  # the draft itself is untouched
    second = sign_report(reports, pid, "Dr B", decision="disagree")
    assert second.name == f"{pid}.v2.signed.html" and first.read_text() == signed  # never overwritten
    log = [json.loads(line) for line in (reports / "audit.jsonl").read_text().splitlines()]
    assert [e["version"] for e in log] == [1, 2] and log[0]["reviewer"] == "Dr A. Reviewer"
    assert log[0]["signed_sha256"] == hashlib.sha256(first.read_bytes()).hexdigest()
    assert log[0]["draft_sha256"] == hashlib.sha256(draft.read_bytes()).hexdigest()
    # A draft rewritten after a signature says so, and the log records it.
    layout, cohort = reported["layout"], reported["cohort"]
    [new] = write_reports(layout, cohort, MODEL, [pid], out_dir=reports, pdf=False)
    assert f"{pid}.v1.signed.html, {pid}.v2.signed.html" in new.read_text()
    assert json.loads((reports / "audit.jsonl").read_text().splitlines()[-1])["status"] == "rewritten-after-signature"
    from fusion.errors import RunError

    with pytest.raises(ValueError, match="decision must be one of"):
        sign_report(reports, pid, "Dr C", decision="maybe")
    with pytest.raises(RunError, match="no draft report for patient NOPE"):
        sign_report(reports, "NOPE", "Dr C")


def test_group_attention_is_averaged_by_group_name_across_folds_that_chose_different_genes():
    """Folds select genes on their own training patients: fold 1 has a group fold 0 lacks and its groups in
    another order. Averaging by position would mislabel them (or fail on unequal counts); by name it does not."""
    from types import SimpleNamespace as NS

    from fusion.report.patient_sections import _group_attention

    def fold(genes, groups):
        return NS(prep=NS(genes=genes, groups=groups))

    fold0 = fold(["TP53_a", "TP53_b", "MYC_a"], [[0, 1], [2]])
    fold1 = fold(["MYC_a", "EGFR_a", "TP53_a"], [[0], [1], [2]])
    out = _group_attention([NS(group_attention=np.array([0.8, 0.2])), NS(group_attention=np.array([0.1, 0.3, 0.6]))],
                           [fold0, fold1])
    by_name = {row["name"]: row["attribution"] for row in out}
    assert by_name == pytest.approx({"TP53": (0.8 + 0.6) / 2, "MYC": (0.2 + 0.1) / 2, "EGFR": 0.3})
    assert _group_attention([NS(group_attention=None)], [fold0]) is None
