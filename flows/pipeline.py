"""The whole pipeline as one Prefect flow: the tiling subflow and per-slide extraction tasks,
then cross-validated training and evaluation.

Resuming is the library's job (every stage skips work whose inputs hash matches what is on
disk), so the tasks need no Prefect result persistence and the flow reruns cheaply; Prefect
adds concurrency, retries and the run's history in its UI.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import task_run
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.tasks import exponential_backoff

from flows.tiling import RETRIES, tile_cohort
from fusion.run import init_run, open_run
from fusion.stages import build_encoders, evaluate_stage, extract_one, slide_rows, train_stage
from fusion.storage import write_json
from fusion.train.evaluate import format_evaluation
from fusion.train.loop import TrainConfig
from fusion.wsi import TilingConfig


@task(name="extract-slide", task_run_name="extract-{slide_id}", cache_policy=NO_CACHE, retries=RETRIES,
      retry_delay_seconds=exponential_backoff(backoff_factor=2))
def extract_slide_task(run: str, slide_id: str, path: str, encoders: list[str]) -> dict:
    layout, _ = open_run(run)
    last_try = task_run.run_count > RETRIES
    return extract_one(layout, slide_id, path, build_encoders(encoders, layout), raise_transient=not last_try)


@task(name="train", task_run_name="train-{config.model}", cache_policy=NO_CACHE)
def train_task(run: str, config: TrainConfig) -> dict:
    layout, cohort = open_run(run)
    logger = get_run_logger()

    def on_epoch(fold: int, epoch: int, record: dict) -> None:
        if epoch % 10 == 0:
            logger.info("fold %d epoch %d: train loss %.3f, val C-index %.3f", fold, epoch,
                        record["train_loss"], record["val_c_index"])

    return train_stage(layout, cohort, config, on_epoch=on_epoch)


@task(name="evaluate", task_run_name="evaluate-{model}", cache_policy=NO_CACHE)
def evaluate_task(run: str, model: str) -> dict:
    layout, cohort = open_run(run)
    return evaluate_stage(layout, cohort, model)


@flow(name="fusion-pipeline", task_runner=ThreadPoolTaskRunner(max_workers=2), log_prints=True)
def pipeline(
    cohort: str,
    run: str,
    tiling: TilingConfig = TilingConfig(),
    train: TrainConfig = TrainConfig(),
    mpp: float | None = None,
) -> dict:
    """Tile every slide, extract features, cross-validate `train.model`, evaluate; return a summary."""
    layout = init_run(run, cohort)
    run = str(layout.root)
    _, cohort_obj = open_run(run)
    slides = slide_rows(cohort_obj)

    tiled = tile_cohort(cohort, run, tiling, mpp)
    ok = [(sid, path) for (sid, path), r in zip(slides, tiled, strict=True) if r["status"] != "failed"]
    extract_futures = [extract_slide_task.submit(run, sid, path, [train.encoder]) for sid, path in ok]
    extracted = [f.result() for f in extract_futures]

    trained = train_task(run, train)
    evaluation = evaluate_task(run, train.model)
    failed = [r for r in tiled + extracted if r["status"] == "failed"]
    summary = {
        "run": run,
        "slides": len(slides),
        "tiles": int(sum(r.get("n_tiles") or 0 for r in tiled)),
        "slides_skipped": {"tile": sum(r["status"] == "skipped" for r in tiled),
                           "extract": sum(r["status"] == "skipped" for r in extracted)},
        "failed": [{"slide_id": r["slide_id"], "error": r["error"]} for r in failed],
        "model": train.model,
        "c_index_mean": trained["c_index_mean"],
        "evaluation": evaluation,
    }
    write_json(Path(run) / "summary.json", summary)
    create_markdown_artifact(key="fusion-run-summary", markdown=_summary_markdown(summary),
                             description=f"fusion run {run}")
    print(format_evaluation(evaluation))
    return summary


def _summary_markdown(summary: dict) -> str:
    """The run's summary as a Markdown table, shown in Prefect's UI as an artifact."""
    ev = summary["evaluation"]
    lines = ["| run | slides | tiles | failed | model | C-index (mean ± sd) | oracle |",
             "|---|---|---|---|---|---|---|",
             f"| {summary['run']} | {summary['slides']} | {summary['tiles']} | {len(summary['failed'])} | "
             f"{summary['model']} | {ev['c_index_mean']:.3f} ± {ev['c_index_sd']:.3f} | "
             f"{ev.get('oracle_c_index_mean', float('nan')):.3f} |"]
    if summary["failed"]:
        lines += ["", "Failed slides:", *[f"- `{f['slide_id']}`: {f['error']}" for f in summary["failed"]]]
    return "\n".join(lines)
