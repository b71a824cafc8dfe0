"""`fusion tile` as a Prefect flow: tasks of a few slides each, for the slides that need tiling.

The cohort is validated once, by the flow: a slide whose file is missing is that slide's failure
(recorded in the ledger, its old outputs moved to RUN/stale/), not the cohort's. Before any task
starts, the flow compares each slide's content and the tiling parameters with the hash stored in
its existing `.h5` (`fusion.stages.tiling_is_current`): slides already tiled start no task at all.
A task touches only its own slides and never reloads the cohort; a bad slide fails alone, and a
transient I/O error is retried inside the task after 2, 4 and 8 s (`fusion.stages.RETRY_DELAYS`).
"""

from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed
from prefect.task_runners import ThreadPoolTaskRunner

from flows.progress import bar
from fusion.run import RunLayout, start_run
from fusion.stages import RETRY_DELAYS, fail_missing_slides, slide_batches, slide_rows, tile_one, tiling_is_current
from fusion.wsi import TilingConfig
from fusion.wsi.qc import write_contact_sheet


def batch_label(slides: list[tuple[str, str]]) -> str:
    """A task run's name: its first slide id, and how many slides it carries."""
    return slides[0][0] if len(slides) == 1 else f"{slides[0][0]}+{len(slides) - 1}"


@task(name="tile-slides", task_run_name="tile-{label}", cache_policy=NO_CACHE)
def tile_slides_task(run: str, slides: list[tuple[str, str]], tiling: TilingConfig, mpp: float | None,
                     tile_set: str = "", label: str = "") -> list[dict]:
    """Tile a batch of slides; one status dict per slide (a failed slide is recorded, never raised)."""
    layout = RunLayout(Path(run))
    results = []
    for sid, path in slides:
        result = tile_one(layout, sid, path, tiling, mpp, tile_set, retry_delays=RETRY_DELAYS)
        if result["status"] == "failed":
            get_run_logger().warning("slide %s failed: %s", sid, result["error"])
        results.append(result)
    return results


@flow(name="fusion-tile", task_runner=ThreadPoolTaskRunner(max_workers=2))
def tile_cohort(cohort: str, run: str, tiling: TilingConfig = TilingConfig(), mpp: float | None = None,
                tile_set: str = "", slides_per_task: int | None = None) -> list[dict]:
    """Tile every slide of `cohort` into `run`/tiles[/<tile_set>]; returns one status dict per slide
    (status 'skipped' for a slide that was already tiled the same way)."""
    layout, cohort_obj = start_run(run, cohort)
    results = {r["slide_id"]: r for r in fail_missing_slides(layout, cohort_obj, "tile", tile_set)}
    todo = []
    for sid, path in slide_rows(cohort_obj):
        if sid in results:
            continue
        n_tiles = tiling_is_current(layout, sid, path, tiling, mpp, tile_set)
        if n_tiles is None:
            todo.append((sid, path))
        else:
            results[sid] = {"slide_id": sid, "status": "skipped", "n_tiles": n_tiles}
    layout.ledger.record("stage", "tile", "planned", todo=[sid for sid, _ in todo], up_to_date=len(results))
    futures = [tile_slides_task.submit(str(layout.root), batch, tiling, mpp, tile_set, batch_label(batch))
               for batch in slide_batches(todo, slides_per_task)]
    progress = bar(f"tiling {len(todo)} slide(s)", total=len(todo))
    for future in as_completed(futures):
        for result in future.result():
            results[result["slide_id"]] = result
            progress.advance()
    ordered = [results[sid] for sid, _ in slide_rows(cohort_obj)]
    write_contact_sheet(layout.tiles_dir(tile_set), ordered, cohort_obj.slides)
    done = sum(r["status"] == "done" for r in ordered)
    failed = sum(r["status"] == "failed" for r in ordered)
    get_run_logger().info("tiled %d slides (%d up to date, %d failed), %d tiles", done, len(ordered) - done - failed,
                          failed, sum(r.get("n_tiles") or 0 for r in ordered))
    return ordered
