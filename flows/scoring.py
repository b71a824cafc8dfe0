"""Scheduled scoring (`fusion serve CONFIG.yaml --cron ...`): new patients in the inbox are tiled,
encoded and scored with the trained model's fold ensemble; their reports are written.

The flow takes the config file's path, not its contents, so a deployment served for months reads
the file as it is on the night it runs. Every step is idempotent (see `fusion.scoring`): a night
that crashed is finished by the next one, and a patient is never scored twice. The inbox keeps a
patient until its prediction (and report) are durably written; a patient that cannot be taken in,
tiled, scored or reported moves to INBOX/failed/<batch>/ with the reason, and the others go on.
"""

import time
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from flows.extraction import extract_cohort
from flows.runners import dask_cluster, slide_task_runner
from flows.tiling import tile_cohort
from fusion.pipeline_config import load_pipeline_config
from fusion.preflight import check_serve
from fusion.run import RunLayout, init_run, open_run
from fusion.scoring import (
    intake_inbox,
    merge_predictions,
    model_encoder,
    move_to_failed,
    release_inbox,
    released_patients,
    retract,
    scored,
    share_encoders,
    subset_cohort,
    unscored,
)
from fusion.storage import Ledger
from fusion.ui import markdown_link

DEPLOYMENT = "nightly-scoring"


@task(name="intake", cache_policy=NO_CACHE)
def intake_task(inbox: str, cohort_dir: str, template: str, batch: str, run_dir: str) -> dict:
    """The inbox's new patients into the scoring cohort; every refusal and warning gets a ledger line."""
    ledger = Ledger(Path(run_dir) / "ledger.jsonl")
    intake = intake_inbox(inbox, cohort_dir, template, batch, released=released_patients(ledger))
    for pid, why in intake.failed.items():
        status = "refused" if pid in intake.scored_before else "failed"
        ledger.record("serve", pid, status, stage="intake", error=why, batch=batch)
    for pid, why in intake.warnings.items():
        ledger.record("serve", pid, "warning", stage="intake", warning=why, batch=batch)
        get_run_logger().warning("%s", why)
    return {"arrived": intake.arrived, "failed": intake.failed, "scored_before": intake.scored_before,
            "warnings": intake.warnings}


@task(name="score", cache_policy=NO_CACHE)
def score_task(run: str, model_dir: str, patient_ids: list[str], batch: str) -> dict:
    from fusion.train.predict import predict_patients

    layout, cohort = open_run(run)
    scores = predict_patients(model_dir, layout, subset_cohort(cohort, patient_ids))
    path = merge_predictions(layout, Path(model_dir).name, scores, batch)
    layout.ledger.record("score", batch, "done", outputs=[str(path)], patients=list(scores.patient_id))
    return {"predictions": str(path), "scores": scores.to_dict("records")}


@task(name="report-new", cache_policy=NO_CACHE)
def report_new_task(run: str, model_dir: str, patient_ids: list[str], pdf: bool = False) -> dict:
    """Reports of these patients: {"reports": paths, "failed": {patient: reason}} (one patient's
    failure is recorded in the ledger by `write_reports` and does not stop the others)."""
    from fusion.report.patient import write_reports

    layout, cohort = open_run(run)
    since = len(layout.ledger.entries())
    written = [str(p) for p in write_reports(layout, cohort, model_dir, patient_ids, pdf=pdf) if p.suffix == ".html"]
    done = {Path(p).stem for p in written}
    reasons = {e["item"]: e.get("error", "") for e in layout.ledger.entries()[since:]
               if e["step"] == "report" and e["status"] == "failed"}
    return {"reports": written,
            "failed": {p: reasons.get(p, "no report was written") for p in patient_ids if p not in done}}


@flow(name="fusion-score-inbox", log_prints=True)
def score_inbox(config_path: str) -> dict:
    """Take the inbox's new patients into the scoring cohort, score every unscored patient, write
    reports, then let the inbox forget the patients whose results are written."""
    config = load_pipeline_config(config_path)
    model_dir = check_serve(config, config_path)  # a missing inbox is an error, never an empty inbox
    serve = config.serve
    encoder, tile_set = model_encoder(model_dir)
    cohort_dir, run_dir = serve.workdir / "cohort", serve.workdir / "run"
    batch = time.strftime("%Y%m%dT%H%M%S")
    result = {"batch": batch, "arrived": [], "patients": [], "reports": [], "failed": [], "failed_patients": {},
              "scored_before": {}, "warnings": {}}

    intake = intake_task(str(serve.inbox), str(cohort_dir), str(config.cohort), batch, str(run_dir))
    result.update(arrived=intake["arrived"], failed_patients=dict(intake["failed"]),
                  scored_before=intake["scored_before"], warnings=intake["warnings"])
    if not (cohort_dir / "cohort.yaml").exists():
        print(f"inbox {serve.inbox} empty and nothing scored yet")
        return result
    run = str(init_run(run_dir, cohort_dir).root)
    layout, cohort = open_run(run)
    share_encoders(RunLayout(Path(config.run)), layout, encoder)  # new patients encoded by the training weights
    todo = unscored(layout, cohort, model_dir.name)
    scores: list[dict] = []
    if todo:
        todo, scores, slide_failures = _score(config, run, cohort_dir, str(model_dir), todo, batch, encoder,
                                              tile_set, result)
        result["failed"] = slide_failures
    else:
        print(f"no new patient in {serve.inbox}")
    result["patients"] = todo
    if serve.reports:
        missing = [p for p in scored(layout, model_dir.name) if not layout.report_path(p).exists()]
        reported = report_new_task(run, str(model_dir), missing, config.report.pdf) if missing else {"reports": [],
                                                                                                     "failed": {}}
        result["reports"] = [r for r in reported["reports"] if Path(r).stem in set(todo)]
        _fail(serve.inbox, cohort_dir, layout, model_dir.name, reported["failed"], batch, result, "report")
    done = scored(layout, model_dir.name)
    if serve.reports:
        done = {p for p in done if layout.report_path(p).exists()}
    released = release_inbox(serve.inbox, done, layout.ledger, batch)
    layout.ledger.record("serve", batch, "done", arrived=result["arrived"], scored=todo, released=released,
                         failed=result["failed_patients"])
    if result.get("predictions"):
        create_markdown_artifact(key="fusion-scoring", markdown=_markdown(result, scores),
                                 description=f"fusion scoring batch {batch}")
        get_run_logger().info("scored %d patient(s) into %s", len(todo), result["predictions"])
    if result["failed_patients"]:
        get_run_logger().warning("%d patient(s) moved to %s: %s", len(result["failed_patients"]),
                                 Path(serve.inbox) / "failed" / batch, ", ".join(sorted(result["failed_patients"])))
    return result


def _score(config, run: str, cohort_dir: Path, model_dir: str, todo: list[str], batch: str, encoder: str,
           tile_set: str, result: dict) -> tuple[list[str], list[dict], list[str]]:
    """Tile, encode and score the unscored patients; a patient with a failed slide, or that the model
    cannot score, fails alone. Returns (scored ids, their scores, failed slide ids)."""
    layout, cohort = open_run(run)
    slides = set(cohort.slides[cohort.slides.patient_id.isin(todo)].slide_id)
    with dask_cluster(config.dask_workers, config.dask_address) as address:
        runner = slide_task_runner(config.workers, address)
        tiled = tile_cohort.with_options(task_runner=runner)(str(cohort_dir), run, config.tiling.build(),
                                                             config.tiling.mpp, tile_set)
        ok = [r["slide_id"] for r in tiled if r["status"] != "failed" and r["slide_id"] in slides]
        extracted = extract_cohort.with_options(task_runner=runner)(run, encoder.split("+"), config.extract.build(),
                                                                    tile_set,
                                                                    slides=ok, gpu_slots=config.extract.gpu_slots)
    bad = {r["slide_id"]: r["error"] for r in tiled + extracted if r["status"] == "failed" and r["slide_id"] in slides}
    owner = dict(zip(cohort.slides.slide_id, cohort.slides.patient_id, strict=True))
    reasons: dict[str, str] = {}
    for sid, error in bad.items():
        reasons[owner[sid]] = f"{reasons[owner[sid]]}; " if owner[sid] in reasons else ""
        reasons[owner[sid]] += f"slide {sid}: {error}"
    _fail(config.serve.inbox, cohort_dir, layout, Path(model_dir).name, reasons, batch, result, "tile")
    todo = [p for p in todo if p not in reasons]
    if not todo:
        return [], [], sorted(bad)
    scored_now = score_task(run, model_dir, todo, batch)
    result["predictions"] = scored_now["predictions"]
    got = {s["patient_id"] for s in scored_now["scores"]}
    unusable = {p: f"the model cannot score this patient: no usable '{encoder}' features (every slide failed or "
                   "none was given) and the model reads slides only" for p in todo if p not in got}
    _fail(config.serve.inbox, cohort_dir, layout, Path(model_dir).name, unusable, batch, result, "score")
    return [p for p in todo if p in got], scored_now["scores"], sorted(bad)


def _fail(inbox, cohort_dir: Path, layout, model: str, reasons: dict[str, str], batch: str, result: dict,
          step: str) -> None:
    """Patients that failed at `step`: out of the scoring cohort, and to INBOX/failed/<batch>/ with the reason."""
    if not reasons:
        return
    retract(cohort_dir, layout, model, set(reasons))
    move_to_failed(inbox, reasons, batch)
    for pid, why in reasons.items():
        layout.ledger.record("serve", pid, "failed", stage=step, error=why, batch=batch)
    result["failed_patients"].update(reasons)


def _markdown(result: dict, scores: list[dict]) -> str:
    reports = {Path(p).stem: p for p in result["reports"]}  # linked through `fusion ui`'s file server
    value = "risk_percentile" if scores and "risk_percentile" in scores[0] else "predicted"
    lines = [f"Batch {result['batch']}: {len(scores)} patient(s) scored into `{result['predictions']}`", "",
             f"| patient | {value} | report |", "|---|---|---|"]
    for s in scores:
        pid = s["patient_id"]
        shown = f"{s[value]:.3f}" if isinstance(s[value], float) else s[value]
        lines.append(f"| {pid} | {shown} | {markdown_link('report', reports[pid]) if pid in reports else ''} |")
    if result["failed"]:
        lines += ["", "Failed slides: " + ", ".join(f"`{s}`" for s in result["failed"])]
    return "\n".join(lines)


def serve_scoring(config_path: str | Path, cron: str, name: str = DEPLOYMENT, work_pool: str | None = None) -> None:
    """Serve the scoring flow as a deployment on `cron` until interrupted (needs a Prefect server).

    With `work_pool`, register the deployment on that pool instead and return: the pool's workers
    (`prefect worker start --pool NAME`, on machines with this repository installed) run it from
    this source folder.
    """
    config_path = str(Path(config_path).resolve())
    check_serve(load_pipeline_config(config_path), config_path)  # fail now, not at 2 a.m.
    options = {"name": name, "cron": cron, "parameters": {"config_path": config_path},
               "description": f"score new patients of the inbox named in {config_path}"}
    if work_pool is None:
        score_inbox.serve(**options)
        return
    source = Path(__file__).resolve().parent.parent
    score_inbox.from_source(str(source), "flows/scoring.py:score_inbox").deploy(work_pool_name=work_pool, **options)
