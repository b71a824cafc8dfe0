"""`fusion tile` as a Prefect flow: one task per slide that needs tiling, run concurrently.

Before any task starts, the flow compares each slide's content and the tiling parameters with the
hash stored in its existing `.h5` (`fusion.stages.tiling_is_current`): slides already tiled start
no task at all, so a rerun after one slide landed runs one task. Each task's library call checks
again, so any entry point (CLI, flow, notebook) is safe. A bad slide fails its own task only; the
flow finishes and returns every slide's status.
"""

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed
from prefect.runtime import task_run
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.tasks import exponential_backoff

from flows.progress import bar
from fusion.run import init_run, open_run
from fusion.stages import slide_rows, tile_one, tiling_is_current
from fusion.wsi import TilingConfig
from fusion.wsi.qc import write_contact_sheet

RETRIES = 3  # transient I/O errors (network storage) are retried after 2, 4 and 8 s


@task(name="tile-slide", task_run_name="tile-{slide_id}", cache_policy=NO_CACHE, retries=RETRIES,
      retry_delay_seconds=exponential_backoff(backoff_factor=2))
def tile_slide_task(run: str, slide_id: str, path: str, tiling: TilingConfig, mpp: float | None,
                    tile_set: str = "") -> dict:
    layout, _ = open_run(run)
    last_try = task_run.run_count > RETRIES  # then a transient error is recorded as a failure
    result = tile_one(layout, slide_id, path, tiling, mpp, tile_set, raise_transient=not last_try)
    if result["status"] == "failed":
        get_run_logger().warning("slide %s failed: %s", slide_id, result["error"])
    return result


@flow(name="fusion-tile", task_runner=ThreadPoolTaskRunner(max_workers=2))
def tile_cohort(cohort: str, run: str, tiling: TilingConfig = TilingConfig(), mpp: float | None = None,
                tile_set: str = "") -> list[dict]:
    """Tile every slide of `cohort` into `run`/tiles[/<tile_set>]; returns one status dict per slide
    (status 'skipped' for a slide that was already tiled the same way)."""
    layout = init_run(run, cohort)
    _, cohort_obj = open_run(layout.root)
    results: dict[str, dict] = {}
    todo = []
    for sid, path in slide_rows(cohort_obj):
        n_tiles = tiling_is_current(layout, sid, path, tiling, mpp, tile_set)
        if n_tiles is None:
            todo.append((sid, path))
        else:
            results[sid] = {"slide_id": sid, "status": "skipped", "n_tiles": n_tiles}
    layout.ledger.record("stage", "tile", "planned", todo=[sid for sid, _ in todo], up_to_date=len(results))
    futures = [tile_slide_task.submit(str(layout.root), sid, path, tiling, mpp, tile_set) for sid, path in todo]
    progress = bar(f"tiling {len(todo)} slide(s)", total=len(todo))
    for future in as_completed(futures):
        result = future.result()
        results[result["slide_id"]] = result
        progress.advance()
    ordered = [results[sid] for sid, _ in slide_rows(cohort_obj)]
    write_contact_sheet(layout.tiles_dir(tile_set), ordered, cohort_obj.slides)
    done = sum(r["status"] == "done" for r in ordered)
    failed = sum(r["status"] == "failed" for r in ordered)
    get_run_logger().info("tiled %d slides (%d up to date, %d failed), %d tiles", done, len(ordered) - done - failed,
                          failed, sum(r.get("n_tiles") or 0 for r in ordered))
    return ordered
