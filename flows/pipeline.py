"""The whole pipeline as one Prefect flow of stage subflows: tile, extract, train, analyze, report.

Each stage decides up front what is stale, from hashes of its inputs and parameters that the
library stores beside its outputs: a slide's content and the tiling parameters for its tiles, the
tiles and encoder version for its features, every slide's features plus the patient tables and
training config for a model, the models' predictions for the analysis and reports. A rerun after
one slide landed therefore tiles and encodes that slide, retrains (the features changed) and
redoes what depends on the models; a rerun with nothing changed starts no slide task and trains nothing.

`pipeline_from_config` is `fusion pipeline CONFIG.yaml`; `pipeline` is `fusion run`'s flag-driven
flavour (one model, no analysis or reports). Both write RUN/summary.json and a Markdown artifact.
"""

from pathlib import Path

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from flows.extraction import extract_cohort
from flows.pretraining import pretrain_encoders
from flows.reporting import analyze_stage, report_stage
from flows.runners import dask_cluster, slide_task_runner
from flows.tiling import tile_cohort
from flows.training import train_models
from fusion.features import ExtractConfig
from fusion.pipeline_config import PipelineConfig
from fusion.run import init_run
from fusion.storage import write_json
from fusion.train.evaluate import best_network, format_evaluation
from fusion.train.loop import TrainConfig
from fusion.ui import files_url, markdown_link
from fusion.wsi import TilingConfig


@flow(name="fusion-pipeline", log_prints=True)
def pipeline(
    cohort: str,
    run: str,
    tiling: TilingConfig = TilingConfig(),
    train: TrainConfig = TrainConfig(),
    mpp: float | None = None,
    workers: int = 2,
    dask_address: str | None = None,
) -> dict:
    """Tile every slide, extract features, cross-validate `train.model`, evaluate; return a summary."""
    run = str(init_run(run, cohort).root)
    runner = slide_task_runner(workers, dask_address)
    tiled = tile_cohort.with_options(task_runner=runner)(cohort, run, tiling, mpp, train.tile_set)
    extracted = extract_cohort.with_options(task_runner=runner)(
        run, [train.encoder], ExtractConfig(), train.tile_set, slides=_tiled_ok(tiled))
    models = train_models(run, [train])
    summary = _summary(run, tiled, extracted, models)
    print(format_evaluation(models[0]["evaluation"]))
    return summary


@flow(name="fusion-pipeline-config", log_prints=True)
def pipeline_from_config(config: PipelineConfig) -> dict:
    """Every stage that `config` asks for, each redoing only what is stale; returns the summary."""
    cohort, tile_set = str(config.cohort), config.tiling.tile_set
    run = str(init_run(config.run, cohort).root)
    with dask_cluster(config.dask_workers, config.dask_address) as address:
        runner = slide_task_runner(config.workers, address)
        tiled = tile_cohort.with_options(task_runner=runner)(cohort, run, config.tiling.build(), config.tiling.mpp,
                                                             tile_set)
        if config.pretrain:  # self-supervised encoders on this run's tiles, before extraction uses them
            pretrain_encoders(run, config.pretrain)
        extracted = extract_cohort.with_options(task_runner=runner)(
            run, config.extract.encoders, config.extract.build(), tile_set, slides=_tiled_ok(tiled),
            gpu_slots=config.extract.gpu_slots)
        for name, section in config.tile_sets.items():  # other magnifications that multi-scale models read
            extra = tile_cohort.with_options(task_runner=runner)(cohort, run, section.build(), section.mpp, name)
            extra += extract_cohort.with_options(task_runner=runner)(
                run, config.extract.encoders, config.extract.build(), name, slides=_tiled_ok(extra),
                gpu_slots=config.extract.gpu_slots)
            extracted += [r for r in extra if r["status"] == "failed"]  # listed as failures; counts stay per slide
    models = train_models(run, config.train_configs())
    analysis = analyze_stage(run, config.analysis.models) if config.analysis.enabled else None
    report_model = config.report_model
    if report_model == "best":  # by the fold-mean C-index of this run's networks
        report_model = best_network(Path(run) / "models", [m["evaluation"] for m in models])
    reports = (report_stage(run, report_model, config.report.patients, config.report.pdf, config.report.horizons)
               if config.report.enabled else [])
    summary = _summary(run, tiled, extracted, models, reports=reports, analysis=analysis is not None)
    for m in models:
        print(f"{m['model']}:\n{format_evaluation(m['evaluation'])}")
    return summary


def _tiled_ok(tiled: list[dict]) -> list[str]:
    return [r["slide_id"] for r in tiled if r["status"] != "failed"]


def _summary(run: str, tiled: list[dict], extracted: list[dict], models: list[dict], reports: list[str] = (),
             analysis: bool = False) -> dict:
    """RUN/summary.json and the Prefect artifact: what each stage did, each model's score, the reports."""
    failed = [r for r in tiled + extracted if r["status"] == "failed"]
    first = models[0]
    summary = {
        "run": run,
        "slides": len(tiled),
        "tiles": int(sum(r.get("n_tiles") or 0 for r in tiled)),
        "slides_done": {"tile": sum(r["status"] == "done" for r in tiled),
                        "extract": sum(r["status"] == "done" for r in extracted)},
        "slides_skipped": {"tile": sum(r["status"] == "skipped" for r in tiled),
                           "extract": sum(r["status"] == "skipped" for r in extracted)},
        "failed": [{"slide_id": r["slide_id"], "error": r["error"]} for r in failed],
        "model": first["model"],
        "c_index_mean": first["summary"].get("c_index_mean", first["summary"].get("auc_mean")),
        "evaluation": first["evaluation"],
        "models": [{"model": m["model"], "retrained": not m["skipped"], "evaluation": m["evaluation"]}
                   for m in models],
        "analysis": str(Path(run) / "analysis") if analysis else None,
        "reports": list(reports),
    }
    write_json(Path(run) / "summary.json", summary)
    create_markdown_artifact(key="fusion-run-summary", markdown=summary_markdown(summary),
                             description=f"fusion run {run}")
    return summary


def summary_markdown(summary: dict) -> str:
    """The run's summary as Markdown tables (shown in Prefect's UI), with links to the reports."""
    done, skipped = summary["slides_done"], summary["slides_skipped"]
    lines = ["| run | slides | tiles | tiled now | encoded now | failed |", "|---|---|---|---|---|---|",
             f"| {summary['run']} | {summary['slides']} | {summary['tiles']} | {done['tile']} "
             f"(+{skipped['tile']} up to date) | {done['extract']} (+{skipped['extract']} up to date) "
             f"| {len(summary['failed'])} |", "",
             "| model | retrained | score (mean ± sd) | oracle |", "|---|---|---|---|"]
    for m in summary["models"]:
        ev = m["evaluation"]
        metric = "auc" if ev.get("task") == "classification" else "c_index"
        oracle = ev.get("oracle_c_index_mean")
        lines.append(f"| {m['model']} | {'yes' if m['retrained'] else 'no (inputs unchanged)'} | "
                     f"{metric} {ev[f'{metric}_mean']:.3f} ± {ev[f'{metric}_sd']:.3f} | "
                     f"{'' if oracle is None else f'{oracle:.3f}'} |")
    if summary["failed"]:
        lines += ["", "Failed slides:", *[f"- `{f['slide_id']}`: {f['error']}" for f in summary["failed"]]]
    return "\n".join(lines + _file_links(summary))


def _file_links(summary: dict) -> list[str]:
    """Links to the tiling QC sheets, the cohort report and the patient reports, through `fusion ui`'s
    file server (browsers refuse file:// links on the UI's page)."""
    run = Path(summary["run"])
    sheets = sorted(run.glob("tiles/**/qc.html"))  # one per tile set: tiles/qc.html, tiles/<set>/qc.html
    lines = [f"Tiling QC: {markdown_link(' '.join(['contact sheet', *p.parent.relative_to(run).parts[1:]]), p)}  "
             for p in sheets]
    if summary.get("analysis"):
        report = Path(summary["analysis"]) / "report.html"
        lines.append(f"Cohort analysis: {markdown_link('analysis/report.html', report)}" if report.exists()
                     else f"Cohort analysis: {markdown_link('analysis/', summary['analysis'])}")
    if summary.get("reports"):
        lines += ["", f"Patient reports ({len(summary['reports'])}):", ""]
        lines += [f"- {markdown_link(Path(p).stem, p)}" for p in summary["reports"]]
    return ["", f"_Links open through `fusion ui` (file server at {files_url()})._", "", *lines] if lines else []
