"""The analysis and report stages: thin tasks over `fusion.report`, skipped when their inputs
(the models' predictions, the patient tables and the options) are what the last run used."""

from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.progress import bar
from fusion.run import open_run
from fusion.stages import mark_stage, stage_is_current, table_hash
from fusion.storage import file_fingerprint, hash_config


def _predictions_hash(layout, models: list[str]) -> dict[str, str | None]:
    out = {}
    for m in models:
        path = layout.model_dir(m) / "predictions.parquet"
        out[m] = file_fingerprint(path) if path.exists() else None
    return out


@task(name="analyze", cache_policy=NO_CACHE)
def analyze_task(run: str, models: list[str] | None = None) -> dict:
    from fusion.report.analysis import analyze_run  # the report package is heavy: load it only here

    layout, cohort = open_run(run)
    names = models or sorted(p.parent.name for p in layout.root.glob("models/*/cv_metrics.json"))
    inputs_hash = hash_config({"predictions": _predictions_hash(layout, names), "patients": table_hash(cohort.patients),
                               "models": models})
    if stage_is_current(layout, "analyze", inputs_hash):
        layout.ledger.record("analyze", "cohort", "skipped", inputs_hash=inputs_hash)
        get_run_logger().info("analysis up to date (same predictions and patients): not redone")
        return {"skipped": True}
    progress = bar("analysing models", total=None)
    result = analyze_run(layout, cohort, models, on_model=lambda done, total: progress.update(completed=done,
                                                                                              total=total))
    mark_stage(layout, "analyze", inputs_hash, models=names)
    layout.ledger.record("analyze", "cohort", "done", inputs_hash=inputs_hash, outputs=[str(layout.analysis)])
    return result


@task(name="report", task_run_name="report-{model}", cache_policy=NO_CACHE)
def report_task(run: str, model: str, patient_ids: list[str] | None = None, pdf: bool = False,
                horizons: list[float] | None = None) -> list[str]:
    """Clinician reports for `patient_ids` (default: all); returns the report paths."""
    from fusion.report.patient import write_reports

    layout, cohort = open_run(run)
    genomics = None if cohort.genomics is None else table_hash(cohort.genomics)
    analysis = layout.analysis / "metrics.json"  # reports quote the cohort analysis when there is one
    inputs_hash = hash_config({"predictions": _predictions_hash(layout, [model]), "genomics": genomics,
                               "patients": table_hash(cohort.patients), "patient_ids": patient_ids, "pdf": pdf,
                               "horizons": horizons,
                               "analysis": file_fingerprint(analysis) if analysis.exists() else None})
    stage = f"report-{model}"
    if stage_is_current(layout, stage, inputs_hash):
        wanted = None if patient_ids is None else set(patient_ids)
        reports = sorted(str(p) for p in (layout.root / "reports").glob("*.html") if wanted is None or p.stem in wanted)
        layout.ledger.record("report", model, "skipped", inputs_hash=inputs_hash)
        get_run_logger().info("%d report(s) up to date (same predictions, tables and options): not rewritten",
                              len(reports))
        return reports
    wanted = len(cohort.patients) if patient_ids is None else len(patient_ids)
    progress = bar(f"writing {wanted} report(s)", total=wanted)
    paths = [str(p) for p in write_reports(layout, cohort, model, patient_ids, pdf=pdf, horizons=horizons,
                                           on_report=lambda _: progress.advance()) if p.suffix == ".html"]
    if len(paths) == wanted:  # a patient whose report failed is tried again by the next run
        mark_stage(layout, stage, inputs_hash, reports=len(paths))
    layout.ledger.record("report", model, "done" if len(paths) == wanted else "partial", inputs_hash=inputs_hash,
                         outputs=paths, failed=wanted - len(paths))
    return paths


@flow(name="fusion-analyze")
def analyze_stage(run: str, models: list[str] | None = None) -> dict:
    """Cohort analysis of the run's models into RUN/analysis/."""
    return analyze_task(run, models)


@flow(name="fusion-report")
def report_stage(run: str, model: str, patient_ids: list[str] | None = None, pdf: bool = False,
                 horizons: list[float] | None = None) -> list[str]:
    """Patient reports into RUN/reports/<patient_id>.html (+ .pdf)."""
    paths = report_task(run, model, patient_ids, pdf, horizons)
    get_run_logger().info("%d report(s) in %s", len(paths), Path(run) / "reports")
    return paths
